"""Property-based fuzzing: random DAG networks and random recipes; the shrunk model must equal the masked one.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default, 200 derandomized examples) and ``slow`` (2000 examples).
The test counts its examples: at least 95% must reach the masked == shrunk oracle (the rest may raise a
``BudgetError`` that says why), and the count is printed in the run's summary. The generator makes prunable
networks (a conv first, a plain conv last feeding a head, GroupNorm over channel pairs) rather than skipping.
A failure Hypothesis finds is fixed in the op rule it names, and the shrunk example is added as a plain test to the
rule's file under ``tests/ops/``.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune import BudgetError
from fxprune.testing import assert_masked_equals_shrunk, state_digest

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("slow", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SIZE = 4  # spatial size kept by every op


class RandomNet(nn.Module):
    """Interprets a program: each step reads earlier tensors (NCHW, spatial SIZE) and appends one."""

    def __init__(self, program: list[tuple], widths: list[int], outputs: list[int], linear_head: bool) -> None:
        super().__init__()
        self.program, self.outputs, self.linear_head = program, outputs, linear_head
        self.layers = nn.ModuleList()
        for step in program:
            self.layers.append(self._make(step, widths))
        self.heads = nn.ModuleList(
            nn.Linear(widths[o] * SIZE * SIZE, 3) if linear_head else nn.Conv2d(widths[o], 3, 1) for o in outputs)

    @staticmethod
    def _make(step: tuple, widths: list[int]) -> nn.Module:
        kind = step[0]
        if kind == "conv":
            _, src, out, groups, norm = step
            layers: list[nn.Module] = [nn.Conv2d(widths[src], out, 3, padding=1, groups=groups)]
            # GroupNorm of pairs of channels: whole pairs prune (one group over all channels would freeze them all)
            layers += {"bn": [nn.BatchNorm2d(out)], "gn": [nn.GroupNorm(out // 2, out)], "none": []}[norm]
            return nn.Sequential(*layers, nn.ReLU())
        if kind == "se":
            c = widths[step[1]]
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(1, c // 2), 1), nn.ReLU(),
                                 nn.Conv2d(max(1, c // 2), c, 1), nn.Sigmoid())
        if kind == "pool":
            return nn.MaxPool2d(3, 1, 1)
        return nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = [x]
        for step, layer in zip(self.program, self.layers):
            kind = step[0]
            if kind in ("conv", "pool"):
                y = layer(xs[step[1]])
            elif kind == "se":
                y = xs[step[1]] * layer(xs[step[1]])
            elif kind == "add":
                y = xs[step[1]] + xs[step[2]]
            elif kind == "mul":
                y = xs[step[1]] * torch.sigmoid(xs[step[2]])
            elif kind == "cat":
                y = torch.cat([xs[i] for i in step[1]], 1)
            elif kind == "split":
                y = torch.split(xs[step[1]], list(step[2]), 1)[step[3]]
            elif kind == "chunk":
                y = xs[step[1]].chunk(2, 1)[step[2]]
            else:  # shuffle
                b, c, h, w = xs[step[1]].shape
                y = xs[step[1]].view(b, step[2], c // step[2], h, w).transpose(1, 2).reshape(b, c, h, w)
            xs.append(y)
        outs = [xs[o] for o in self.outputs]
        if self.linear_head:
            return tuple(head(torch.flatten(F.relu(o), 1)) for head, o in zip(self.heads, outs))
        return tuple(head(o) for head, o in zip(self.heads, outs))


@st.composite
def networks(draw: st.DrawFn) -> RandomNet:
    widths = [3]
    program: list[tuple] = []
    n_steps = draw(st.integers(3, 10))
    for i in range(n_steps):
        src = draw(st.integers(0, len(widths) - 1))
        c = widths[src]
        same = [i for i, w in enumerate(widths) if w == c and i != src]
        options = ["conv", "conv", "conv", "pool", "se"] + (["add", "mul"] if same else []) + \
                  (["cat"] if len(widths) > 1 else []) + (["split"] if c >= 2 else []) + \
                  (["chunk", "shuffle", "shuffle"] if c % 2 == 0 and c >= 4 else [])
        # A conv first, and a plain conv last (it feeds a head): every network has a prunable group.
        last = i == n_steps - 1
        kind = "conv" if i == 0 or last else draw(st.sampled_from(options))
        if kind == "conv":
            out = draw(st.sampled_from([4, 6, 8, 12, 16]))
            divisors = [g for g in (1, 2, c) if c % g == 0 and out % g == 0]
            groups = draw(st.sampled_from(divisors)) if src != 0 and not last else 1
            norm = draw(st.sampled_from(["bn", "none"] if last else ["bn", "gn", "none"]))
            step, width = ("conv", src, out, groups, norm), out
        elif kind in ("pool", "se"):
            step, width = (kind, src), c
        elif kind in ("add", "mul"):
            step, width = (kind, src, draw(st.sampled_from(same))), c
        elif kind == "cat":
            parts = draw(st.lists(st.integers(0, len(widths) - 1), min_size=2, max_size=3))
            step, width = ("cat", tuple(parts)), sum(widths[i] for i in parts)
        elif kind == "split":
            first = draw(st.integers(1, c - 1))
            piece = draw(st.sampled_from([0, 1, -1]))  # -1: the last item (a Res2Net-style spx[-1])
            step, width = ("split", src, (first, c - first), piece), (first, c - first)[piece]
        elif kind == "chunk":
            step, width = ("chunk", src, draw(st.integers(0, 1))), c // 2
        else:
            step, width = ("shuffle", src, 2), c
        program.append(step)
        widths.append(width)
    n = len(widths)  # the last conv feeds a head; another output may be any tensor
    outputs = sorted({n - 1, *draw(st.lists(st.integers(1, n - 1), min_size=0, max_size=1))})
    return RandomNet(program, widths, outputs, draw(st.booleans()))


@st.composite
def recipes(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["sparsity", "flops", "params"]))
    # Frozen heads hold most parameters of these small nets: params targets stay within what they leave.
    fractions = [0.1, 0.2, 0.3] if kind == "params" else [0.2, 0.3, 0.5, 0.6]
    return {"stages": [{
        "kind": "channels", "target": {kind: draw(st.sampled_from(fractions))},
        "criterion": draw(st.sampled_from(["l1", "l2", "bn_scale", "random"])),
        "scope": draw(st.sampled_from(["local", "global"])), "round_to": draw(st.sampled_from([1, 2, 4])),
        "steps": draw(st.sampled_from([1, 1, 2])), "seed": draw(st.integers(0, 3)),
    }]}


def _check(net: RandomNet, recipe: dict, batch: int, counts: collections.Counter, budget_errors: list[str]) -> None:
    net = net.eval()
    with torch.no_grad():  # non-trivial norm parameters so masked channels really matter
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(batch, 3, SIZE, SIZE)
    state = state_digest(net)
    counts["examples"] += 1
    try:
        pruned = fxprune.compile(net, recipe, example_inputs=x)
    except BudgetError as exc:  # a legitimate answer for nets with little to prune: it must say why
        assert "cannot be met" in str(exc)
        counts["budget_error"] += 1
        budget_errors.append(str(exc)[:120])
        return
    assert state_digest(net) == state, "input model was modified"
    with torch.no_grad():
        assert [o.shape for o in pruned(x)] == [o.shape for o in net(x)]
    assert_masked_equals_shrunk(net, pruned.fxprune_plan, (x,), pruned)
    counts["oracle"] += 1


def test_random_networks_masked_equals_shrunk(record_property: Callable[[str, object], None]) -> None:
    """Every generated network either meets the oracle or raises a ``BudgetError`` that says why; at least 95% of
    the examples reach the oracle (the count is printed in the run's summary, see ``tests/conftest.py``)."""
    counts: collections.Counter = collections.Counter()
    budget_errors: list[str] = []
    given(net=networks(), recipe=recipes(), batch=st.integers(1, 2))(
        lambda net, recipe, batch: _check(net, recipe, batch, counts, budget_errors))()
    record_property("fxprune_count", f"fuzz: {counts['oracle']} of {counts['examples']} examples reached the "
                                     f"masked == shrunk oracle ({counts['budget_error']} BudgetError)")
    assert counts["oracle"] >= 0.95 * counts["examples"], (dict(counts), budget_errors)
    assert counts["examples"] >= settings().max_examples * 0.9, dict(counts)
