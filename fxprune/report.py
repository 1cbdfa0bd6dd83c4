"""Reports: parameters, MACs, per-layer widths before and after pruning, frozen groups with reasons, and (when asked)
measured latency before and after with the latency target's prediction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .copies import shared_copy
from .inputs import as_input_tuple
from .latency import model_ratios
from .modes import eval_no_grad
from .submodule import capture_inputs
from .trace import record_shapes, trace, unwrap
from .work import count_model

_WIDTHS = (("in_channels", "out_channels"), ("in_features", "out_features"), ("num_features", "num_features"),
           ("num_channels", "num_channels"))


def _width(m: nn.Module) -> tuple[int, int] | None:
    for a, b in _WIDTHS:
        if hasattr(m, a) and hasattr(m, b) and isinstance(getattr(m, a), int):
            return getattr(m, a), getattr(m, b)
    return None


@dataclass
class Report:
    """What pruning changed. ``str(report)`` is a readable table."""

    params: tuple[int, int]
    macs: tuple[int, int]
    layers: list[tuple[str, str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    frozen: list[dict] = field(default_factory=list)
    submodule: str = ""
    capture: list[str] = field(default_factory=list)  # automatic leaves and guards of the capture (fxprune.capture)
    latency_ms: tuple[float, float] | None = None  # measured before / after (``measure_latency=True``)
    predicted_ms: float | None = None  # a latency target's prediction, scaled to the measured ``before``

    @property
    def latency_ratio(self) -> float | None:
        return self.latency_ms[1] / self.latency_ms[0] if self.latency_ms and self.latency_ms[0] else None

    @property
    def params_ratio(self) -> float:
        return self.params[1] / self.params[0] if self.params[0] else 1.0

    @property
    def macs_ratio(self) -> float:
        return self.macs[1] / self.macs[0] if self.macs[0] else 1.0

    def __str__(self) -> str:
        lines = [f"params {self.params[0]:,} -> {self.params[1]:,} ({self.params_ratio:.3f}x)",
                 f"MACs   {self.macs[0]:,} -> {self.macs[1]:,} ({self.macs_ratio:.3f}x)"
                 + (f" of submodule '{self.submodule}'" if self.submodule else "")]
        if self.latency_ms is not None:
            t0, t1 = self.latency_ms
            lines.append(f"latency {t0:.3f} ms -> {t1:.3f} ms ({t1 / t0 if t0 else 1.0:.3f}x, measured)")
            if self.predicted_ms is not None:
                ratio = self.predicted_ms / t0 if t0 else 1.0
                lines.append(f"latency predicted {self.predicted_ms:.3f} ms ({ratio:.3f}x, latency target's lookup "
                             f"table)")
        lines += ["",
                 f"{'layer':40s} {'type':18s} {'in':>11s} {'out':>11s}"]
        for name, kind, (i0, o0), (i1, o1) in self.layers:
            lines.append(f"{name:40s} {kind:18s} {f'{i0}->{i1}':>11s} {f'{o0}->{o1}':>11s}")
        leaves = [c for c in self.capture if c.startswith("auto leaf")]
        if leaves:
            lines += ["", f"automatic leaves ({len(leaves)}, kept unpruned):", *[f"  {c}" for c in leaves]]
        if self.frozen:
            lines += ["", f"frozen groups ({len(self.frozen)}):"]
            for g in self.frozen:
                lines.append(f"  {', '.join(p.lstrip('@') for p in g['params'][:4])}: {'; '.join(g['reasons'][:2])}")
        return "\n".join(lines)


def report(before: nn.Module, after: nn.Module, example_inputs: Any, measure_latency: bool = False) -> Report:
    """Compare an original model with its pruned version on ``example_inputs``.

    ``measure_latency=True`` also times both models on ``example_inputs`` (interleaved medians, in eval mode, on
    their device and at the current thread count) and, for a plan made for a latency target, shows the latency its
    lookup table predicted.

    For a model pruned with a recipe ``submodule`` (a detector's backbone), MACs are those of that submodule on
    the inputs it receives from one run of the whole model (the rest may not trace); params are whole-model counts.
    """
    from .capture.leaves import capture_lines

    bind = example_inputs
    inputs = as_input_tuple(example_inputs)
    sub = getattr(getattr(after, "fxprune_recipe", None), "submodule", "") or ""
    before, after = unwrap(before)[0], unwrap(after)[0]  # torch.compile / DataParallel wrappers
    if sub:
        sub_inputs, _ = capture_inputs(before, sub, inputs)
        pairs = [(before.get_submodule(sub), sub_inputs, sub_inputs), (after.get_submodule(sub), sub_inputs,
                                                                        sub_inputs)]
    else:  # the pruned GraphModule takes the inputs in graph order
        pairs = [(before, bind, inputs), (after, inputs, inputs)]
    counts: list[dict] = []
    notes: list[str] = []
    for model, given, args in pairs:
        gm = trace(shared_copy(model).eval(), example_inputs=given)  # weights shared: traced, run in eval mode
        record_shapes(gm, args)
        counts.append(count_model(gm))
        notes = notes or capture_lines(gm)
    if sub:
        for c, model in zip(counts, (before, after)):
            c["params"] = sum(p.numel() for p in model.parameters())
    after_modules = dict(after.named_modules())
    layers = []
    for name, m in before.named_modules():
        w0 = _width(m)
        m1 = after_modules.get(name)
        w1 = _width(m1) if m1 is not None else None
        if w0 is not None and w1 is not None:
            layers.append((name, type(m).__name__, w0, w1))
    plan = getattr(after, "fxprune_plan", None)
    out = Report((counts[0]["params"], counts[1]["params"]), (counts[0]["macs"], counts[1]["macs"]), layers,
                 list(plan.frozen) if plan is not None else [], sub, notes)
    if measure_latency:
        with eval_no_grad(before, after):
            (t0, _), (_, ratio_after) = model_ratios([before, after], inputs)
        out.latency_ms = (t0, ratio_after * t0)  # the after time from the median per-round ratio
        ratio = plan.stats.get("latency_predicted_ratio") if plan is not None else None
        out.predicted_ms = float(ratio) * t0 if ratio is not None else None
    return out


__all__ = ["Report", "report"]
