"""Training-free accuracy recovery after channel pruning: ``recover: [bn, bias, lstsq]`` on a pruning stage.

* ``bn`` (``bn.py``): re-estimate every BatchNorm's running statistics on the calibration batches;
* ``bias`` (``bias.py``): fold the removed input channels' expected contribution into each consumer's bias;
* ``lstsq`` (``lstsq.py``): refit each consumer by ridge least squares to the dense model's output.

They run on the stage's ``data`` after the stage's plan is applied, as ``bias``, then ``lstsq``, then ``bn``, in
whatever order they are listed: ``bn`` re-estimates the statistics of the *final* weights once (a ``bn`` pass
before ``bias`` would be overwritten exactly, since the bias step reads only the dense model).

When the calibration activations fit in ``lstsq``'s ``cache_mb`` (2 GiB by default), ``sequential.py`` runs all
three in one dense and one pruned pass: every layer is refit, and every BatchNorm re-estimated, on the activations
of the model whose upstream layers are already final (exact sequential reconstruction). Otherwise ``lstsq``
streams (``lstsq.py``: nothing of the calibration set is held, one pass per band of levels) and ``bn`` makes a
pass of its own at the end. Every statistic is summed over ``torch.distributed`` ranks (``fxprune.distributed``).

Example:
    >>> recipe = {"stages": [{"target": {"flops": 0.5}, "recover": ["bn", "bias", "lstsq"]}]}
    >>> pruned = fxprune.compile(model, recipe, example_inputs=x, data=calibration_batches)
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from torch import fx, nn

from ..errors import FxPruneError, RecipeError
from ..plan import Plan
from . import bias as _bias
from . import bn as _bn
from . import lstsq as _lstsq
from . import sequential as _sequential
from .capture import eval_no_grad
from .layers import Consumer, find_consumers
from .lstsq import LstsqOptions

log = logging.getLogger(__name__)

#: the recovery methods (they run as bias, lstsq, bn)
METHODS = ("bn", "bias", "lstsq")


def _method_name(item: Any) -> Any:
    return next(iter(item)) if isinstance(item, dict) and len(item) == 1 else item


def validate_recover(value: Any, path: str) -> None:
    """Check a stage's ``recover`` field: a list of ``"bn"``, ``"bias"``, ``"lstsq"`` (or ``{"lstsq": {options}}``),
    each at most once. Raises ``RecipeError`` naming ``path`` (``stages[i].recover``)."""
    if not isinstance(value, list):
        raise RecipeError(path, f"must be a list of recovery methods ({', '.join(METHODS)}), got {value!r}")
    names = []
    for j, item in enumerate(value):
        name = _method_name(item)
        if not isinstance(name, str) or name not in METHODS:
            raise RecipeError(f"{path}[{j}]", f"unknown recovery method {item!r}; use {', '.join(METHODS)} "
                                              f"(or {{lstsq: {{ridge: ..., passes: ...}}}})")
        if isinstance(item, dict):
            if name != "lstsq":
                raise RecipeError(f"{path}[{j}]", f"'{name}' takes no options; only lstsq does")
            _lstsq_options(item["lstsq"], f"{path}[{j}].lstsq")
        if name in names:
            raise RecipeError(f"{path}[{j}]", f"'{name}' is listed twice")
        names.append(name)


def _lstsq_options(raw: Any, path: str) -> LstsqOptions:
    if not isinstance(raw, dict):
        raise RecipeError(path, f"must be a mapping of options ({', '.join(f.name for f in fields(LstsqOptions))}), "
                                f"got {raw!r}")
    known = {f.name for f in fields(LstsqOptions)}
    for key, v in raw.items():
        if key not in known:
            raise RecipeError(f"{path}.{key}", f"unknown option; known: {', '.join(sorted(known))}")
        if key == "ridge" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise RecipeError(f"{path}.ridge", f"must be a number >= 0, got {v!r}")
        if key == "products":
            if v not in ("float32", "float64"):
                raise RecipeError(f"{path}.products", f"must be 'float32' or 'float64', got {v!r}")
            continue
        bound = 0 if key in ("passes", "cache_mb") else 1
        if key != "ridge" and (isinstance(v, bool) or not isinstance(v, int) or v < bound):
            raise RecipeError(f"{path}.{key}", f"must be an integer >= {bound}, got {v!r}")
    return LstsqOptions(**raw)


def parse_methods(value: Sequence[Any]) -> tuple[list[str], LstsqOptions]:
    """The method names of a (validated) ``recover`` list and the ``lstsq`` options."""
    names, opts = [], LstsqOptions()
    for item in value:
        name = _method_name(item)
        names.append(name)
        if isinstance(item, dict):
            opts = _lstsq_options(item[name], "recover")
    return names, opts


def _refit(dense: nn.Module, pruned: fx.GraphModule, consumers: list[Consumer], data: Any, opts: LstsqOptions,
           bias_step: _bias.BiasCompensation | None, bn: bool, report: dict[str, Any]) -> bool:
    """``lstsq`` (and ``bias``): cached and exactly sequential when the activations fit in ``opts.cache_mb``
    (re-estimating the BatchNorms on the way if ``bn``), else streamed. Returns whether the BatchNorms are done."""
    todo = _lstsq.fittable(consumers, pruned, opts)
    records = None
    fuse_bn = False
    if todo and opts.cache_mb > 0 and isinstance(pruned, fx.GraphModule):
        nested = _sequential.graph_norms(pruned)[1] if bn else []
        fuse_bn = bn and not nested  # a BatchNorm inside a leaf module: a bn pass of its own at the end
        records = _sequential.reconstruct(dense, pruned, todo, data, opts, bias_step, fuse_bn, report)
        if records is None:  # over the budget: the bias statistics were applied on the way
            bias_step = None
            fuse_bn = False
    if records is None:
        records = _lstsq.reconstruct(dense, pruned, todo, data, opts, bias_step)
    report["lstsq"] = records
    return fuse_bn


def recover(dense: nn.Module, pruned: fx.GraphModule, plan: Plan, data: Any, methods: Sequence[Any],
            options: LstsqOptions | None = None) -> dict[str, Any]:
    """Apply the recovery ``methods`` to ``pruned`` in place.

    Args:
        dense: the model the plan was made on (a traced copy, or the original module: its submodule paths are
            those of ``pruned``); it is only read, and its train/eval flags are restored.
        pruned: the shrunk ``GraphModule`` (``plan`` applied to ``dense``).
        plan: the plan whose indices refer to ``dense``.
        data: calibration batches, as for data-driven criteria (labels are ignored).
        methods: a list as in the recipe field, e.g. ``["bn", "bias", "lstsq"]``.
        options: ``lstsq`` options (overriding any given in ``methods``).

    Returns:
        A report: ``consumers`` (layer paths), ``bias`` and ``lstsq`` records, ``bn`` (layers updated), ``seconds``.
    """
    validate_recover(list(methods), "recover")
    names, opts = parse_methods(methods)
    opts = options or opts
    if data is None:
        raise FxPruneError("recover needs data: pass fxprune.compile(..., data=<iterable of calibration batches>)")
    start = time.perf_counter()
    consumers: list[Consumer] = find_consumers(dense, pruned, plan)
    report: dict[str, Any] = {"consumers": [c.path for c in consumers]}
    with eval_no_grad(dense, pruned):
        bias_step = _bias.BiasCompensation(dense, pruned, consumers) if "bias" in names else None
        bn_done = False
        if "lstsq" in names:  # shares its (first) dense pass with the bias step
            bn_done = _refit(dense, pruned, consumers, data, opts, bias_step, "bn" in names, report)
        elif bias_step is not None:
            _bias.run_bias_step(bias_step, data)
        if bias_step is not None:
            report["bias"] = bias_step.records
        if "bn" in names and not bn_done:
            report["bn"] = _bn.reestimate(pruned, data)
    report["seconds"] = time.perf_counter() - start
    log.info("recover %s: %d consumer layers in %.2f s", "+".join(m for m in METHODS if m in names), len(consumers),
             report["seconds"])
    return report


def stage_begin(gm: fx.GraphModule, stage: Any, ctx: Any) -> fx.GraphModule | None:
    """For a stage with ``recover``: check that there is data and return a copy of ``gm`` before pruning (the
    dense reference); ``None`` when the stage recovers nothing."""
    methods = getattr(stage, "recover", None)
    if not methods:
        return None
    if ctx.data is None:
        where = ctx.options.get("stage", "stage") if isinstance(getattr(ctx, "options", None), dict) else "stage"
        raise FxPruneError(f"{where}.recover {methods!r} needs data: pass fxprune.compile(..., data=<iterable of "
                           f"calibration batches>)")
    return copy.deepcopy(gm)


def stage_finish(dense: fx.GraphModule | None, gm: fx.GraphModule, plan: Plan, stage: Any, ctx: Any) -> None:
    """Recover ``gm`` (pruned by ``plan`` from ``dense``, the copy ``stage_begin`` returned) as ``stage.recover``
    says; nothing when ``dense`` is ``None``."""
    if dense is not None and plan.kept:
        recover(dense, gm, plan, ctx.data, stage.recover)


__all__ = ["METHODS", "LstsqOptions", "parse_methods", "recover", "stage_begin", "stage_finish", "validate_recover"]
