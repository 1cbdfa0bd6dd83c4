"""nn.MultiheadAttention as a leaf: PrunedMultiheadAttention reproduces it, heads / head dims / features couple as
internal axes, masked (zeroed copies) == shrunk, and the user's model is never touched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.criteria import get_criterion
from fxprune.criteria.base import ScoreContext
from fxprune.nn.attention import PrunedMultiheadAttention
from fxprune.testing import (
    analyze_model,
    assert_masked_equals_shrunk,
    channel_recipe,
    prune_and_check,
    state_digest,
    units_of,
)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_pruned_module_equals_torch_mha(batch_first: bool, need_weights: bool) -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    ours = PrunedMultiheadAttention.from_torch(mha)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}):
            want, want_w = mha(x, x, x, need_weights=need_weights, **kwargs)
            got, got_w = ours(x, x, x, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
            else:
                assert got_w is None


class MHANet(nn.Module):
    def __init__(self, need_weights: bool = False) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.pre, self.inp = nn.Linear(8, 24), nn.Linear(24, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(torch.relu(self.pre(x)))
        y, _ = self.attn(x, x, x, need_weights=self.need_weights)
        return self.head(y)


X = torch.randn(2, 6, 8)


def test_heads_and_head_dims_are_separate_groups() -> None:
    a = analyze_model(MHANet(), X)
    groups = {key: a.space_group[a.index[fxprune.ir.space.Space.parse(key)]]
              for key in ("@attn:0:0", "@attn:0:1", "@attn:0:2", "@attn:0:3", "@attn:0:4")}
    assert len(set(groups.values())) == 5
    assert len(np.unique(units_of(a, "@attn:0:0"))) == 4  # one unit per head
    np.testing.assert_array_equal(units_of(a, "@attn:0:3"), units_of(a, "@inp:0:0"))  # in_proj columns read inp


def test_mha_masked_equals_shrunk_and_model_untouched() -> None:
    model = MHANet().eval()
    before = state_digest(model)
    original_attn = model.attn
    pruned = prune_and_check(model, channel_recipe(0.5), X)
    attn = pruned.attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert (attn.num_heads, attn.qk_dim, attn.v_dim, attn.in_dim, attn.out_dim) == (2, 4, 4, 16, 16)
    assert attn.in_proj_weight.shape == (2 * (4 + 4 + 4), 16) and attn.out_proj.weight.shape == (16, 8)
    assert attn.scale == pytest.approx(8 ** -0.5)  # the original head dim's temperature
    assert model.attn is original_attn and isinstance(model.attn, nn.MultiheadAttention)
    assert state_digest(model) == before
    # a second stage prunes the swapped-in module again (the rule handles both types)
    again = fxprune.compile(pruned, channel_recipe(0.5), example_inputs=X)
    assert again.attn.num_heads == 1
    assert_masked_equals_shrunk(pruned, again.fxprune_plan, (X,), again)


@pytest.mark.parametrize("axis,expect", [(0, "heads"), (1, "qk"), (2, "v")])
def test_each_internal_axis_alone_masked_equals_shrunk(axis: int, expect: str) -> None:
    model = MHANet().eval()
    pruned = prune_and_check(model, channel_recipe(0.5, ignore=["pre", "inp", "head"]), X)
    assert pruned.attn.num_heads == 2  # every internal axis is prunable at once; check each was sliced
    plan = pruned.fxprune_plan
    assert f"@attn:0:{axis}" in plan.kept, expect
    key = f"@attn:0:{axis}"
    single = fxprune.Plan({key: plan.kept[key]}, {key: plan.sizes[key]})
    assert_masked_equals_shrunk(model, single, (X,))


def test_need_weights_true_keeps_heads_frozen() -> None:
    model = MHANet(need_weights=True).eval()
    pruned = prune_and_check(model, channel_recipe(0.5), X)
    assert isinstance(pruned.attn, nn.MultiheadAttention) and pruned.pre.out_features == 12
    text = str(fxprune.report(model, pruned, X))
    assert "need_weights=True" in text


def test_l2_scores_a_head_by_its_qkv_rows_and_out_proj_columns() -> None:
    model = MHANet().eval()
    a = analyze_model(model, X)
    scores = get_criterion("l2").score(a, ScoreContext())
    w, wo = model.attn.in_proj_weight.detach(), model.attn.out_proj.weight.detach()
    for h, unit in enumerate(units_of(a, "@attn:0:0")):
        rows = torch.cat([torch.arange(8) + h * 8 + s * 32 for s in range(3)])
        want = (w[rows].pow(2).sum() + wo[:, h * 8:(h + 1) * 8].pow(2).sum()).sqrt()
        assert scores[unit] == pytest.approx(float(want), rel=1e-5)
