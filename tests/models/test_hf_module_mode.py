"""Hugging Face ``ViTForImageClassification`` (2 layers, hidden 64, 4 heads, 32 px, patch 8, random weights) pruned
in module mode with a heads stage then a channels stage that leaves the second MLP whole (non-uniform widths): the
result is still the transformers class, so ``model(pixel_values=x, labels=y).loss`` trains it (gradients reach the
shrunk weights). ``save_pretrained`` writes it; ``from_pretrained`` rebuilds a uniform result from the updated
config, but cannot rebuild this one (the config has one ``intermediate_size``); ``fxprune.load`` can, and the
``save_pretrained`` weights load into what it returns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification

import fxprune

RECIPE = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                     {"kind": "channels", "target": {"flops": 0.3}, "ignore": ["vit.layers.1.mlp*"]}]}
CONFIG = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, num_labels=3)


def dense() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def pruned() -> tuple[ViTForImageClassification, ViTForImageClassification, torch.Tensor]:
    model = dense()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, fxprune.compile(model, RECIPE, example_inputs={"pixel_values": x}, output="module"), x


def test_result_is_the_transformers_class_with_fewer_heads_and_channels(pruned: tuple) -> None:
    model, result, x = pruned
    assert type(result) is ViTForImageClassification
    heads = []
    for layer in result.vit.layers:  # ViTAttention.forward views q/k/v as (..., -1, head_dim)
        attention = layer.attention
        kept, rest = divmod(attention.q_proj.out_features, attention.head_dim)
        assert rest == 0 and attention.num_attention_heads == kept, (attention.num_attention_heads, kept)
        for proj in (attention.k_proj, attention.v_proj):
            assert proj.out_features == kept * attention.head_dim
        assert attention.o_proj.in_features == kept * attention.head_dim
        heads.append(kept)
    assert sum(heads) <= 4, heads  # heads at sparsity 0.5 (4 of the 8), then channels may remove more
    assert sum(p.numel() for p in result.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    graph = fxprune.compile(model, RECIPE, example_inputs={"pixel_values": x})
    with torch.no_grad():
        torch.testing.assert_close(result(pixel_values=x).logits, graph(x).logits, rtol=1e-4, atol=1e-5)


def test_labels_give_a_loss_whose_gradients_reach_the_shrunk_weights(pruned: tuple) -> None:
    model, result, x = pruned
    result = result.train()
    y = torch.tensor([0, 2])
    out = result(pixel_values=x, labels=y)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    out.loss.backward()
    dense_shapes = {k: v.shape for k, v in model.named_parameters()}
    shrunk = 0
    for name, p in result.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
        shrunk += p.shape != dense_shapes[name]
    assert shrunk > 0
    query = result.vit.layers[0].attention.q_proj.weight
    assert query.grad.abs().sum() > 0
    result.zero_grad()
    result.eval()


def test_save_pretrained_then_fxprune_load_round_trips(pruned: tuple, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, result, x = pruned
    widths = [layer.mlp.fc1.out_features for layer in result.vit.layers]
    assert widths[0] < 128 == widths[1]  # non-uniform: config.intermediate_size cannot say both
    result.save_pretrained(tmp_path)  # config.json + model.safetensors, the Hugging Face checkpoint
    fxprune.save(result, tmp_path / "fxprune.fxp")  # the plan (and the same weights)
    again = fxprune.load(tmp_path / "fxprune.fxp", lambda: ViTForImageClassification(ViTConfig(**CONFIG)))
    assert type(again) is ViTForImageClassification
    assert [layer.mlp.fc1.out_features for layer in again.vit.layers] == widths
    with torch.no_grad():
        want = result(pixel_values=x).logits
        torch.testing.assert_close(again(pixel_values=x).logits, want, rtol=0, atol=0)
    # save_pretrained stored the shrunk tensors, under transformers' on-disk key names (transformers 5 renames
    # vit.layers.N.attention.q_proj to the legacy vit.encoder.layer.N.attention.attention.query on disk)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(tuple(v.shape) for v in on_disk.values()) == sorted(tuple(v.shape) for v in
                                                                       result.state_dict().values())


def test_from_pretrained_cannot_rebuild_non_uniform_widths(pruned: tuple, tmp_path: Path) -> None:
    _, result, _ = pruned
    result.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # size mismatches are refused
        ViTForImageClassification.from_pretrained(tmp_path)
    wrong = ViTForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert wrong.vit.layers[0].mlp.fc1.out_features == 128  # the config's width, re-initialised: not the model


def test_from_pretrained_rebuilds_uniform_widths_from_the_updated_config(tmp_path: Path) -> None:
    model = dense()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                         {"kind": "channels", "target": {"flops": 0.5}}]}
    result = fxprune.compile(model, recipe, example_inputs={"pixel_values": x}, output="module")
    fc1 = {layer.mlp.fc1.out_features for layer in result.vit.layers}
    heads = {layer.attention.num_attention_heads for layer in result.vit.layers}
    assert len(fc1) == len(heads) == 1, "this recipe prunes both layers alike"
    config = result.config
    assert (config.num_attention_heads, config.intermediate_size) == (heads.pop(), fc1.pop())
    assert config.head_dim == result.vit.layers[0].attention.head_dim == 16  # no longer hidden // heads
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 128  # user's model untouched
    result.save_pretrained(tmp_path)
    rebuilt = ViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(rebuilt(pixel_values=x).logits, result(pixel_values=x).logits, rtol=0, atol=0)
