"""Reduced-size torchvision Swin (v1, v2) and MaxViT: attention heads are pruning units.

Pruning tests prove the physically pruned model equals the original with the removed heads / channels zeroed
(``prune_and_check``) and check what the rewrite did to the attention: ``num_heads`` arguments, the relative
position bias tables (v1), the continuous-bias MLP (v2), ``logit_scale`` (v2) and MaxViT's modules. Reference tests
compare fxprune's attention functions with torchvision's, and the MAC counts with torchvision's published GFLOPS.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torchvision.models import swin_transformer as swin

import fxprune
from fxprune.ir.space import Space
from fxprune.ops.window_attention import window_attention
from fxprune.testing import (
    analyze_model,
    assert_compiles,
    assert_masked_equals_shrunk,
    channel_recipe,
    frozen_of,
    prune_and_check,
    units_of,
)
from fxprune.work import count_model, count_work

torch.set_num_threads(1)


def small_swin(v2: bool) -> swin.SwinTransformer:
    """Two stages, 4x4 windows (so an 8x8 map has 4 windows and the shifted blocks use the attention mask)."""
    torch.manual_seed(0)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[4, 4], window_size=[4, 4],
                                 num_classes=5, **extra).eval()
    with torch.no_grad():  # random tables, so masking a head's bias really matters
        for m in model.modules():
            if isinstance(m, swin.ShiftedWindowAttention):
                if isinstance(m, swin.ShiftedWindowAttentionV2):
                    m.logit_scale.uniform_(1.0, 3.0)
                else:
                    m.relative_position_bias_table.normal_()
    return model


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _attention_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    targets = (window_attention, swin.shifted_window_attention)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_window_attention_against_torchvision(v2: bool) -> None:
    """fxprune's ``window_attention`` (used after pruning) computes what torchvision's function computes."""
    model = small_swin(v2)
    x = model.features[0](_x())  # B H W C after the patch embedding
    for block in model.features[1]:  # shift 0 and shift 2
        attn = block.attn
        bias = attn.get_relative_position_bias()
        args = (x, attn.qkv.weight, attn.proj.weight, bias, attn.window_size, attn.num_heads)
        kw = {"shift_size": attn.shift_size, "qkv_bias": attn.qkv.bias, "proj_bias": attn.proj.bias, "training": False,
              "logit_scale": getattr(attn, "logit_scale", None)}
        with torch.no_grad():
            torch.testing.assert_close(window_attention(*args, **kw), swin.shifted_window_attention(*args, **kw))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_heads_are_units(v2: bool) -> None:
    model = small_swin(v2)
    a = analyze_model(model, _x())
    table = "cpb_mlp.2:0:0" if v2 else "relative_position_bias_table:0:1"
    for stage in ("features.1.0.attn", "features.3.1.attn"):
        assert not frozen_of(a, f"@{stage}.qkv.weight:0:0").any()
        assert not frozen_of(a, f"@{stage}.{table}").any()
        if v2:
            assert not frozen_of(a, f"@{stage}.logit_scale:0:0").any()
        rows = units_of(a, f"@{stage}.qkv.weight:0:0").reshape(3, 4, -1)  # (q/k/v, head, head_dim)
        assert len(set(rows[:, 0].ravel())) == 1 and len(set(rows[:, :, 0].ravel())) == 4  # one unit per head


@pytest.mark.parametrize("target", ["sparsity", "flops"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_channels_stage_prunes_heads(v2: bool, target: str) -> None:
    model, x = small_swin(v2), _x()
    before = count_work(model, x)
    pruned = prune_and_check(model, channel_recipe(0.5, target), x)
    nodes = _attention_nodes(pruned)
    assert len(nodes) == 4 and all(n.target is window_attention for n in nodes)
    heads = [n.args[5] for n in nodes]
    assert sum(heads) < 16, heads
    for n, h, head_dim in zip(nodes, heads, (4, 4, 8, 8)):  # embed dims 16, 16, 32, 32 over 4 heads
        w_qkv, w_proj = (pruned.get_parameter(a.target) for a in n.args[1:3])
        assert w_qkv.shape == (3 * h * head_dim, 4 * head_dim) and w_proj.shape == (4 * head_dim, h * head_dim)
        assert n.args[3].meta["fxprune"].shape == (1, h, 16, 16)
    tables = {k: v for k, v in pruned.state_dict().items() if k.endswith("relative_position_bias_table")}
    if v2:
        tables = {k: v.t() for k, v in pruned.state_dict().items() if k.endswith("cpb_mlp.2.weight")}
        scales = [v.shape[0] for k, v in pruned.state_dict().items() if k.endswith("logit_scale")]
        assert scales == heads
    assert [t.shape[1] for t in tables.values()] == heads
    ratio = count_model(pruned)["macs"] / before["macs"]
    assert ratio < 0.9
    if target == "flops":
        assert 0.49 <= 1 - ratio <= 0.51


def small_maxvit() -> torch.nn.Module:
    """Two stages of 16 and 32 channels with head_dim 8 (2 and 4 heads), 2x2 partitions on 8x8 and 4x4 maps."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    return model


def _maxvit_attention(gm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    return {n: m for n, m in gm.named_modules() if isinstance(m, RelativePositionalMultiHeadAttention)}


def test_pruned_maxvit_attention_against_torchvision() -> None:
    """``PrunedRelPosAttention`` keeping everything computes what torchvision's module computes; keeping heads 0 and 2
    of 4 and q/k features 0-5, v features 2-7 of each computes what torchvision's module computes with those rows
    zeroed by hand."""
    from fxprune.ops.maxvit_attention import PrunedRelPosAttention

    att = small_maxvit().get_submodule("blocks.1.layers.0.layers.window_attention.attn_layer.1")
    x = torch.randn(2, 4, 4, 32, generator=torch.Generator().manual_seed(2))
    every, dims, io = torch.arange(4), torch.arange(8), torch.arange(32)
    zeroed = copy.deepcopy(att)
    with torch.no_grad():
        rows = [part * 32 + torch.arange(h * 8, h * 8 + 8) for part in range(3) for h in (1, 3)]  # heads 1, 3
        rows += [part * 32 + h * 8 + torch.tensor([6, 7]) for part in range(2) for h in range(4)]  # q/k features 6, 7
        rows += [64 + h * 8 + torch.tensor([0, 1]) for h in range(4)]  # v features 0, 1
        zeroed.to_qkv.weight[torch.cat(rows)] = 0
        zeroed.to_qkv.bias[torch.cat(rows)] = 0
        torch.testing.assert_close(PrunedRelPosAttention.select(att, every, dims, dims, io, io)(x), att(x))
        kept = PrunedRelPosAttention.select(att, torch.tensor([0, 2]), dims[:6], dims[2:], io, io)
        assert kept.to_qkv.weight.shape == (2 * (6 + 6 + 6), 32) and kept.merge.weight.shape == (32, 12)
        torch.testing.assert_close(kept(x), zeroed(x))


def test_maxvit_heads_are_units_and_embedding_frozen() -> None:
    model = small_maxvit()
    a = analyze_model(model, _x())
    paths = list(_maxvit_attention(model))
    assert len(paths) == 4  # a window and a grid attention per stage
    for path in paths:
        assert not frozen_of(a, f"@{path}:0:0").any()  # heads
        assert frozen_of(a, f"@{path}:0:1").all() and frozen_of(a, f"@{path}:0:2").all()  # LayerNorm / residual
        assert any("LayerNorm" in r for g in {int(a.space_group[a.index[Space.parse(f'@{path}:0:1')]])}
                   for r in a.group_reasons(g))


@pytest.mark.parametrize("target", ["sparsity", "flops"])
def test_maxvit_channels_stage_prunes_heads(target: str) -> None:
    from fxprune.ops.maxvit_attention import PrunedRelPosAttention

    model, x = small_maxvit(), _x()
    before = count_work(model, x)
    pruned = prune_and_check(model, channel_recipe(0.5, target), x)
    original = _maxvit_attention(model)
    after = _maxvit_attention(pruned)
    assert after.keys() == original.keys()
    removed = 0
    for path, m in after.items():
        o = original[path]
        h, dq, dv = m.n_heads, getattr(m, "qk_dim", m.head_dim), getattr(m, "v_dim", m.head_dim)
        assert m.head_dim == o.head_dim and 1 <= h <= o.n_heads and 1 <= dq <= m.head_dim and 1 <= dv <= m.head_dim
        assert m.to_qkv.weight.shape == (h * (2 * dq + dv), o.to_qkv.in_features)
        assert m.merge.weight.shape == (o.merge.out_features, h * dv)
        assert m.relative_position_bias_table.shape == (o.relative_position_bias_table.shape[0], m.n_heads)
        removed += o.n_heads - m.n_heads
        assert isinstance(m, PrunedRelPosAttention) or m.n_heads == o.n_heads
    assert removed > 0
    ratio = count_model(pruned)["macs"] / before["macs"]
    assert ratio < 0.9
    if target == "flops":
        assert 0.49 <= 1 - ratio <= 0.51


def test_pruned_swin_compiles_fullgraph_without_graph_breaks() -> None:
    model, x = small_swin(v2=True), _x()
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=x)
    assert any(n.args[5] < 4 for n in _attention_nodes(pruned))  # heads really went
    assert_compiles(pruned, x)


@pytest.mark.parametrize("build", [functools.partial(small_swin, True), small_maxvit], ids=["swin_v2", "maxvit"])
def test_save_load_round_trip_replays_head_pruning(build, tmp_path) -> None:
    model, x = build(), _x()
    pruned = fxprune.compile(model, channel_recipe(0.5, "flops"), example_inputs=x)
    with torch.no_grad():  # stands in for fine-tuning: the saved weights are not the sliced originals
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = fxprune.save(pruned, tmp_path / "model.fxp", example_inputs=x)
    loaded = fxprune.load(path, build, example_inputs=x)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


HEADS_RECIPE = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}, "criterion": "l2"}]}


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_heads_stage_removes_half_the_heads_and_nothing_else(v2: bool) -> None:
    model, x = small_swin(v2), _x()
    before = count_work(model, x)
    pruned = prune_and_check(model, HEADS_RECIPE, x)
    assert [n.args[5] for n in _attention_nodes(pruned)] == [2, 2, 2, 2]
    shrunk = {k.split(":")[0] for k in pruned.fxprune_plan.kept if k.startswith("@")}
    assert shrunk and all(".attn." in k for k in shrunk), shrunk  # no MLP, no embedding channel
    table = ("cpb_mlp.2.weight", 0) if v2 else ("relative_position_bias_table", 1)
    sizes = [v.shape[table[1]] for k, v in pruned.state_dict().items() if k.endswith(table[0])]
    assert sizes == [2, 2, 2, 2]
    assert count_model(pruned)["macs"] < before["macs"]


def test_maxvit_heads_stage_removes_half_the_heads_and_nothing_else() -> None:
    model, x = small_maxvit(), _x()
    before = count_work(model, x)
    pruned = prune_and_check(model, HEADS_RECIPE, x)
    heads = {p: (m.n_heads, m.relative_position_bias_table.shape[1]) for p, m in _maxvit_attention(pruned).items()}
    assert sorted(heads.values()) == [(1, 1), (1, 1), (2, 2), (2, 2)]  # 2 and 4 heads per stage, halved
    assert all(".attn_layer.1" in k for k in pruned.fxprune_plan.kept if k.startswith("@"))
    assert count_model(pruned)["macs"] < before["macs"]


class _OddWindowAttention(torch.nn.Module):
    """Calls torchvision's window attention with a 3-D bias ``[heads, N, N]``: legal, but not the layout the rule
    knows, so its heads must stay frozen (with the node named), and pruning must still be exact elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.qkv, self.proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
        self.bias = torch.nn.Parameter(torch.randn(2, 4, 4))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = swin.shifted_window_attention(self.inp(x), self.qkv.weight, self.proj.weight, self.bias, [2, 2], 2, [0, 0],
                                          qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=False)
        return self.out(y.mean((1, 2)))


def test_unknown_window_attention_layout_freezes_heads_with_the_node_named() -> None:
    model, x = _OddWindowAttention().eval(), torch.randn(2, 4, 4, 8)
    a = analyze_model(model, x)
    assert frozen_of(a, "@qkv.weight:0:0").all() and frozen_of(a, "@bias:0:0").all()
    reasons = a.group_reasons(int(a.space_group[a.index[Space.parse("@qkv.weight:0:0")]]))
    assert any("window_attention cannot shrink" in r and "shifted_window_attention" in r for r in reasons), reasons
    pruned = prune_and_check(model, channel_recipe(0.5), x)  # the MLP in front still prunes exactly
    assert pruned.get_submodule("inp.0").out_features == 8


def test_patch_merging_pad_channels_follow_the_four_copies() -> None:
    """Swin's ``_patch_merging_pad`` maps channel c to c, C+c, 2C+c, 3C+c: a Linear feeding it prunes exactly."""

    class Merge(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(24, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(swin._patch_merging_pad(torch.relu(self.a(x)))).sum((1, 2))

    model, x = Merge().eval(), torch.randn(2, 5, 5, 3)  # odd sizes: the pad path
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.a.out_features == 3 and pruned.b.in_features == 12


@pytest.mark.parametrize("build", [functools.partial(small_swin, False), small_maxvit], ids=["swin_v1", "maxvit"])
def test_a_pruned_model_prunes_again(build) -> None:
    """The rewritten nodes (``window_attention``) and swapped modules (``PrunedRelPosAttention``) have rules too."""
    model, x = build(), _x()
    once = fxprune.compile(model, channel_recipe(0.5), example_inputs=x)
    twice = prune_and_check(once, channel_recipe(0.3), x)
    assert count_model(twice)["macs"] < count_model(once)["macs"]


@pytest.mark.parametrize("name,size", [("swin_t", 224), ("swin_v2_t", 256), ("maxvit_t", 224)])
def test_macs_match_torchvision_published_ops(name: str, size: int) -> None:
    """The window attention and MaxViT attention MAC counts reproduce torchvision's published GFLOPS (``_ops``)."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None).eval()
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"]
    macs = count_work(model, torch.zeros(1, 3, size, size))["macs"]
    assert macs / 1e9 == pytest.approx(published, abs=1e-3)


HEAD_DIM_RECIPE = {"stages": [{"kind": "head_dim", "target": {"sparsity": 0.5}, "criterion": "l2"}]}


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_head_dim_stage_shrinks_per_head_features(v2: bool, tmp_path) -> None:
    """v1: q/k and v features of every head shrink (scale pinned); v2's cosine attention keeps q/k, v shrinks."""
    model, x = small_swin(v2), _x()
    before = count_work(model, x)
    pruned = fxprune.compile(model, HEAD_DIM_RECIPE, example_inputs=x)
    entry = next(e for e in pruned.fxprune_plan.rewrites if e["pass"] == "head_dim")  # the stage's channel plan
    assert_masked_equals_shrunk(model, fxprune.Plan(entry["kept"], entry["sizes"]), (x,), pruned)
    for n, head_dim in zip(_attention_nodes(pruned), (4, 4, 8, 8)):
        assert n.args[5] == 4  # every head stays
        w_qkv, w_proj = (pruned.get_parameter(a.target) for a in n.args[1:3])
        dv = w_proj.shape[1] // 4
        assert n.kwargs.get("v_dim", dv) == dv
        dq = (w_qkv.shape[0] - 4 * dv) // 8
        assert w_proj.shape[1] == 4 * dv and w_qkv.shape[0] == 4 * (2 * dq + dv)
        if v2:  # only v features are units: half of them go
            assert dq == head_dim and dv == head_dim // 2
        else:  # q/k features and v features are units of one group: half of all go
            assert dq + dv == head_dim and dq >= 1 and dv >= 1
            assert n.kwargs.get("scale") == (head_dim ** -0.5 if dq < head_dim else None)
    assert count_model(pruned)["macs"] < before["macs"]
    build = functools.partial(small_swin, v2)
    loaded = fxprune.load(fxprune.save(pruned, tmp_path / "m.fxp", example_inputs=x), build, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


def test_swin_heads_then_head_dim_on_the_rewritten_attention() -> None:
    """The head_dim stage on a heads-pruned Swin (its nodes already call ``window_attention``) is exact too."""
    model, x = small_swin(False), _x()
    once = fxprune.compile(model, HEADS_RECIPE, example_inputs=x)
    twice = fxprune.compile(once, HEAD_DIM_RECIPE, example_inputs=x)
    entry = twice.fxprune_plan.rewrites[0]
    assert_masked_equals_shrunk(once, fxprune.Plan(entry["kept"], entry["sizes"]), (x,), twice)
    assert [n.args[5] for n in _attention_nodes(twice)] == [2, 2, 2, 2]
    assert count_model(twice)["macs"] < count_model(once)["macs"]


def test_maxvit_head_dim_stage_shrinks_per_head_features() -> None:
    model, x = small_maxvit(), _x()
    pruned = fxprune.compile(model, HEAD_DIM_RECIPE, example_inputs=x)
    entry = next(e for e in pruned.fxprune_plan.rewrites if e["pass"] == "head_dim")
    assert_masked_equals_shrunk(model, fxprune.Plan(entry["kept"], entry["sizes"]), (x,), pruned)
    original = _maxvit_attention(model)
    for path, m in _maxvit_attention(pruned).items():
        assert m.n_heads == original[path].n_heads  # heads stay
        assert m.qk_dim + m.v_dim == 8  # half of the 16 per-head features (q/k and v) go
        assert m.to_qkv.weight.shape[0] == m.n_heads * (2 * m.qk_dim + m.v_dim)
