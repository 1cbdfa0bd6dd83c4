"""Sequence-length constants after the gather: only the token dim changes, even when a head width equals the
token count, and a reshape of a tensor without tokens (an attention-pool query) is left alone."""
from __future__ import annotations

import timm
import torch
from papr_reference import reference_token_indices, take
from torch import nn

import fxprune


def _siglip() -> nn.Module:
    """A SigLIP-style ViT: no class token, an attention-pool (MAP) head, 8x8 = 64 tokens and head width 64."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=128, depth=2, embed_dim=128,
                             num_heads=2, num_classes=5).eval()


def _keep_half(model: nn.Module, proposal: nn.Module, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model pruned at keep 0.5 (64 patches, no prefix at the gather: 32 kept), 3 images, reference indices."""
    torch.manual_seed(seed)
    x = torch.randn(3, 3, 128, 128)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "tests:tiny"}]},
                             example_inputs=x[:1])
    entry = pruned.fxprune_plan.rewrites[0]
    assert (entry["prefix"], entry["tokens"]) == (0, 32)
    return pruned, x, reference_token_indices(proposal, x, (8, 8), 0.5, prefix=0)


def _blocks_on(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.norm(model.blocks(model.norm_pre(tokens))))


def test_head_width_equal_to_the_token_count_is_kept(tiny_proposal: nn.Module) -> None:
    model = _siglip()
    pruned, x, idx = _keep_half(model, tiny_proposal, 3)
    with torch.no_grad():
        want = _blocks_on(model, take(model.patch_embed(x) + model.pos_embed, idx))
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)
    sizes = [n.args[1:] for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    heads = [s for s in sizes if len(s) >= 4]  # (B, N, 3, H, 64) qkv, (B, 1, H, 64) pool query, (B, N, 2, H, 64) kv
    assert len(heads) == 4 and all(s[-1] == 64 for s in heads), heads


def test_register_token_concatenated_after_the_gather(tiny_proposal: nn.Module) -> None:
    """``no_embed_class`` ViTs add the position embedding to the 64 patches, then prepend a register token: the
    blocks see 65 tokens, and a width of 64 (= the patch count) must not change."""
    torch.manual_seed(0)
    model = timm.create_model("vit_wee_patch16_reg1_gap_256", pretrained=False, img_size=128, depth=2, embed_dim=64,
                              num_heads=2, num_classes=5).eval()
    pruned, x, idx = _keep_half(model, tiny_proposal, 5)
    with torch.no_grad():
        t = take(model.patch_embed(x) + model.pos_embed, idx)
        t = torch.cat([model.reg_token.expand(3, -1, -1), t], dim=1)  # 33 tokens from here on
        torch.testing.assert_close(pruned(x), _blocks_on(model, t), atol=1e-5, rtol=1e-5)
