"""Attention op rules on timm's real ``Attention`` block (fused sdpa and manual matmul paths) and on a bare
``F.scaled_dot_product_attention`` whose head dim shrinks: coupling checks and masked == shrunk."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

import fxprune
from fxprune.testing import (
    analyze_model,
    assert_masked_equals_shrunk,
    channel_recipe,
    frozen_of,
    prune_and_check,
    units_of,
)


class AttnNet(nn.Module):
    """tokens (B, N, 8) -> Linear -> timm Attention (4 heads of 8) -> Linear head."""

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = Attention(32, num_heads=4, qkv_bias=True)
        self.attn.fused_attn = fused
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.inp(x)))


X = torch.randn(2, 6, 8)


@pytest.mark.parametrize("fused", [True, False])
def test_qkv_rows_of_one_head_form_one_unit(fused: bool) -> None:
    a = analyze_model(AttnNet(fused), X)
    units = units_of(a, "@attn.qkv:0:0").reshape(3, 4, 8)  # (q|k|v, head, head_dim)
    for h in range(4):
        assert len(np.unique(units[:, h])) == 1  # q, k and v rows of head h are removed together
    assert len(np.unique(units[:, :, 0])) == 4  # four heads, four units
    np.testing.assert_array_equal(units_of(a, "@attn.proj:0:1").reshape(4, 8)[:, 0], units[0, :, 0])
    assert not frozen_of(a, "@attn.qkv:0:0").any()


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_heads_masked_equals_shrunk(fused: bool) -> None:
    model = AttnNet(fused).eval()
    pruned = prune_and_check(model, channel_recipe(0.5), X)
    assert pruned.attn.qkv.out_features == 3 * 2 * 8 and pruned.attn.proj.in_features == 16
    reshapes = [n for n in pruned.graph.nodes if n.target == "reshape"]
    assert [a for a in reshapes[0].args[3:]] == [3, 2, 8]  # (3, num_heads, head_dim) rewritten
    assert reshapes[-1].args[-1] == 16  # the merge back to num_heads * head_dim
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape


class BareSdpa(nn.Module):
    """Per-head projections on a (B, H, N, C) input, so the head dim (16) is free to shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16)
        self.o = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


def test_sdpa_head_dim_shrinks_with_the_original_scale_pinned() -> None:
    x = torch.randn(2, 3, 5, 8)
    model = BareSdpa().eval()
    a = analyze_model(model, x)
    np.testing.assert_array_equal(units_of(a, "@q:0:0"), units_of(a, "@k:0:0"))  # q·k dims tied
    assert not np.intersect1d(units_of(a, "@q:0:0"), units_of(a, "@v:0:0")).size  # v's dim is its own group
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.q.out_features == pruned.k.out_features == 8 and pruned.v.out_features == 8
    sdpa = next(n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(16))
    # without the pinned scale the shrunk model would not equal the masked one
    sdpa.kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "scale"}
    pruned.recompile()
    with pytest.raises(AssertionError, match="shrunk != masked"):
        assert_masked_equals_shrunk(model, pruned.fxprune_plan, (x,), pruned)


def test_key_tokens_are_frozen_and_reported() -> None:
    a = analyze_model(AttnNet(), X)
    sdpa = next(n for n in a.gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    key = sdpa.args[1]
    assert frozen_of(a, f"{key.name}:0:2").all()
    reasons = {r for g in range(a.space_group.max() + 1) for r in a.group_reasons(g)}
    assert any("key/value tokens" in r for r in reasons)


def test_matmul_macs_count_both_products() -> None:
    base = fxprune.work.count_work(AttnNet(False).eval(), X)["macs"]
    fused = fxprune.work.count_work(AttnNet(True).eval(), X)["macs"]
    assert base == fused  # q@kᵀ and attn@v (manual) count what sdpa counts: B·H·N·N·(D + D)
    linears = 2 * 6 * (8 * 32 + 32 * 96 + 32 * 32 + 32 * 5)
    assert fused - linears == 2 * 4 * 6 * 6 * 16


class SizesFromInput(nn.Module):
    """Twins-style attention: the merge ``reshape(B, N, C)`` reads ``C`` off the block's input, which keeps its
    width when heads go, so the rewrite must replace that computed size by the new constant."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(16, 48), nn.Linear(16, 16), 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + self.proj(out)


def test_computed_merge_size_is_rewritten() -> None:
    pruned = prune_and_check(SizesFromInput().eval(), channel_recipe(0.5), torch.randn(2, 5, 16))
    assert pruned.qkv.out_features == 24 and pruned.proj.in_features == 8
    merge = [n for n in pruned.graph.nodes if n.target == "reshape"][-1]
    assert merge.args[-1] == 8


def test_single_head_attention_prunes_head_dim_with_pinned_scale() -> None:
    model = nn.Sequential(nn.Linear(8, 32), Attention(32, num_heads=1, qkv_bias=True), nn.Linear(32, 5)).eval()
    pruned = prune_and_check(model, channel_recipe(0.5, ignore=["0", "2"]), X)
    assert pruned.get_submodule("1.qkv").out_features == 48  # q, k and v each keep 16 of 32 features
    sdpa = next(n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == pytest.approx(32 ** -0.5)
