"""Cached sequential reconstruction: ``lstsq`` (with the ``bias`` statistics and, with ``bn``, the BatchNorm
re-estimation) in one forward of the dense model and one of the pruned model over the calibration set.

1. **Dense pass.** One streamed pass of the dense model keeps, for every batch, its inputs and every consumer's
   regression targets (its dense output at the sampled positions and kept channels), and gathers the ``bias``
   step's statistics on the way.
2. **Pruned pass.** The pruned graph then runs node by node, each node on every cached batch before the next
   node (an ``fx.Interpreter``; a value is freed after its last use). At a consumer's call its Gram matrices are
   folded from its inputs on every batch, then solved and written *before* the node computes its output. With
   ``bn``, a BatchNorm's running statistics are re-estimated at its node from its input on every batch (the
   average of the batch means and unbiased batch variances, as ``bn.py``), and it then normalizes with them.

Every layer is thus fit on exactly the activations the final model produces at its input: all layers upstream of
it, refit consumers and re-estimated BatchNorms alike, already hold their final values (exact sequential
reconstruction, SparseGPT-style; the same fits as the streamed ``passes: 0``). The ``bn`` statistics differ from
``bn.py``'s separate pass in one respect: the upstream BatchNorms normalize with their re-estimated statistics
(eval mode, as the final model runs) rather than with each batch's own.

**Memory.** Held at once: every batch's inputs and targets, and the pruned graph's live values at its widest point
for every batch, estimated from the first batch by a meta-device run. If that exceeds ``cache_mb`` on any rank, the
dense pass stops keeping anything (it still gathers the bias statistics) and ``reconstruct`` returns ``None``: the
caller then streams (``lstsq.py``), holding no activation across batches.

A layer called more than once is fit at its last call on the rows of all its calls; the nodes between its calls
read its earlier outputs with the weights it had. The same holds for a BatchNorm called more than once.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from .. import distributed
from ..errors import FxPruneError
from ..progress import calibration_pass
from ..trace import MetaShapeRecorder
from .bias import BiasCompensation
from .bn import batch_stats
from .capture import input_batches, run_watching
from .gram import Gram
from .layers import Consumer
from .lstsq import LstsqOptions, input_rows, solve_and_write, target_rows

log = logging.getLogger(__name__)


def nbytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or a nest of tuples, lists and dicts)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


class _LivePeak(fx.Interpreter):
    """Runs a graph once and records the most bytes of node values alive at one time (values freed after their
    last use, as the pruned pass frees them)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.live = self.peak = 0
        self.sizes: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = fx.Interpreter.run_node(self, n)  # not ShapeRecorder's: nothing is written on the graph
        self.sizes[n] = nbytes(result)
        self.live += self.sizes[n]
        self.peak = max(self.peak, self.live)
        for dead in self.user_to_last_uses.get(n, []):
            self.live -= self.sizes.pop(dead, 0)
        return result


class _MetaLivePeak(_LivePeak, MetaShapeRecorder):
    """``_LivePeak`` on the meta device: shapes only, no arithmetic."""


def live_peak_bytes(gm: fx.GraphModule, inputs: tuple) -> int:
    """Peak bytes of ``gm``'s live node values on ``inputs`` (meta-device run; a real one if an op has no meta
    kernel)."""
    try:
        meter: _LivePeak = _MetaLivePeak(gm)
        meter.run(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs])
    except Exception as exc:  # an op without a meta kernel: measure for real on this batch
        log.debug("recover lstsq: meta-device size estimate failed (%s); measuring on the first batch", exc)
        meter = _LivePeak(gm)
        with torch.no_grad():
            meter.run(*inputs)
    return meter.peak


def _gather(dense: nn.Module, pruned: fx.GraphModule, todo: list[Consumer], data: Any, opts: LstsqOptions,
            bias_step: BiasCompensation | None) -> tuple[list[tuple], dict[str, list[list]]] | None:
    """The dense pass: every batch's inputs and each consumer's targets ``[batch][call]``; ``None`` when they would
    not fit in ``opts.cache_mb`` on some rank. The bias statistics are gathered (and applied) either way."""
    budget = opts.cache_mb * 2 ** 20
    modules = {c.path: pruned.get_submodule(c.path) for c in todo}
    batches: list[tuple] = []
    targets: dict[str, list[list]] = {c.path: [] for c in todo}
    held, per_input_byte, over = 0, None, False

    def keep(c: Consumer):
        def fn(x: torch.Tensor, y: torch.Tensor) -> None:
            targets[c.path][-1].append(target_rows(c, modules[c.path], y, opts.positions))
        return fn

    calls = {c.path: c.calls for c in todo}
    on_input = {}
    if bias_step is not None:
        calls.update(bias_step.calls)
        on_input = bias_step.hooks()
    for inputs in input_batches(data, "recover 'lstsq'", "recover lstsq dense pass"):
        if over:  # only the bias statistics are still wanted
            if on_input:
                run_watching(dense, inputs, calls, on_input=on_input)
            continue
        for c in todo:
            targets[c.path].append([])
        run_watching(dense, inputs, calls, on_input=on_input, on_output={c.path: keep(c) for c in todo})
        if per_input_byte is None:  # the pruned pass' widest point, relative to the size of the batch
            per_input_byte = live_peak_bytes(pruned, inputs) / max(1, nbytes(inputs))
        held += sum(nbytes(t[-1]) for t in targets.values()) + int(per_input_byte * nbytes(inputs))
        batches.append(inputs)
        if held > budget:
            log.info("recover lstsq: the calibration activations exceed cache_mb %d after %d batches; streaming",
                     opts.cache_mb, len(batches))
            over, batches, targets = True, [], {}
    over = distributed.all_reduce_max(int(over)) > 0  # every rank takes the same path
    if bias_step is not None:
        bias_step.apply()
    if over:
        return None
    log.info("recover lstsq: caching %d batches, about %.0f MiB", len(batches), held / 2 ** 20)
    return batches, targets


def _first_input(interp: fx.Interpreter, node: fx.Node) -> torch.Tensor:
    args, kwargs = interp.fetch_args_kwargs_from_env(node)
    return args[0] if args else next(iter(kwargs.values()))


class _NormStats:
    """``bn`` at a BatchNorm node: its running statistics from its input on every batch (summed over ranks, and over
    the module's calls so far)."""

    def __init__(self, m: _BatchNorm, path: str) -> None:
        self.m, self.path = m, path
        self.total = torch.zeros(2 * m.num_features + 1, dtype=torch.float64, device=m.running_mean.device)

    def update(self, xs: list[torch.Tensor]) -> None:
        c = self.m.num_features
        s = torch.zeros_like(self.total)
        for x in xs:
            n = x.numel() // max(1, x.shape[1])
            if n < 2:
                raise FxPruneError(f"recover 'bn': BatchNorm '{self.path}' sees {n} value per channel in a "
                                   f"calibration batch; batches need at least 2 values per channel (use larger "
                                   f"batches)")
            mean, var = batch_stats(x)
            s[:c] += mean.double()
            s[c:2 * c] += var.double() * (n / (n - 1))
            s[-1] += 1
        distributed.all_reduce_sum(s)
        self.total += s
        with torch.no_grad():
            self.m.running_mean.copy_((self.total[:c] / self.total[-1]).to(self.m.running_mean.dtype))
            self.m.running_var.copy_((self.total[c:2 * c] / self.total[-1]).to(self.m.running_var.dtype))


def graph_norms(pruned: fx.GraphModule) -> tuple[dict[str, _BatchNorm], list[str]]:
    """The BatchNorms with running statistics that are graph nodes (``{path: module}``), and the paths of those
    that are not (inside leaf modules: the pruned pass cannot re-estimate them)."""
    targets = {str(n.target) for n in pruned.graph.nodes if n.op == "call_module"}
    nodes, nested = {}, []
    for path, m in pruned.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            if path in targets:
                nodes[path] = m
            else:
                nested.append(path)
    return nodes, nested


def _pruned_pass(dense: nn.Module, pruned: fx.GraphModule, todo: list[Consumer], batches: list[tuple],
                 targets: dict[str, list[list]], opts: LstsqOptions, norms: dict[str, _BatchNorm],
                 report: dict[str, Any]) -> list[dict]:
    interp = fx.Interpreter(pruned)
    args = [iter(pruned.graph.process_inputs(*inputs)) for inputs in batches]
    envs: list[dict[fx.Node, Any]] = [{} for _ in batches]
    batches.clear()  # the environments own the inputs now
    calls = {name: (c, j) for c in todo for j, name in enumerate(c.nodes)}
    stats: dict[str, _NormStats] = {}
    grams: dict[str, Gram] = {}
    records: list[dict] = []
    nodes = [n for n in pruned.graph.nodes if n.op != "output"]
    for node in calibration_pass(nodes, "recover lstsq pruned pass", unit="nodes"):
        hit = calls.get(node.name) if node.op == "call_module" else None
        if hit is not None:
            c, j = hit
            m = pruned.get_submodule(c.path)
            for b, env in enumerate(envs):
                interp.env = env
                rows = input_rows(c, m, _first_input(interp, node), opts.positions)
                y, targets[c.path][b][j] = targets[c.path][b][j], None
                if c.path not in grams:
                    grams[c.path] = opts.gram(rows, y)
                grams[c.path].add(rows, y)
            if j == c.calls - 1:
                records.append(solve_and_write(dense, pruned, c, grams.pop(c.path), opts, restore_norms=not norms))
        elif node.op == "call_module" and str(node.target) in norms:
            path = str(node.target)
            stat = stats.setdefault(path, _NormStats(norms[path], path))
            xs = []
            for env in envs:
                interp.env = env
                xs.append(_first_input(interp, node))
            stat.update(xs)
        for b, env in enumerate(envs):
            interp.env = env
            if node.op == "placeholder":
                interp.args_iter = args[b]
            env[node] = interp.run_node(node)
            for dead in interp.user_to_last_uses.get(node, []):
                del env[dead]
            if not node.users:
                del env[node]
    report["bn"] = len(stats)
    return records


def reconstruct(dense: nn.Module, pruned: fx.GraphModule, todo: list[Consumer], data: Any, opts: LstsqOptions,
                bias_step: BiasCompensation | None = None, fuse_bn: bool = False,
                report: dict[str, Any] | None = None) -> list[dict] | None:
    """Refit ``todo`` (consumers of ``pruned``, in topological order) in one dense and one pruned pass over ``data``;
    with ``bias_step``, its statistics ride on the dense pass and are applied first; with ``fuse_bn``, every
    BatchNorm node is re-estimated on the way (``report["bn"]``: how many). Returns the lstsq records, or ``None``
    (nothing refit, no BatchNorm changed; the bias step applied) when the activations exceed ``opts.cache_mb``."""
    report = {} if report is None else report
    norms = graph_norms(pruned)[0] if fuse_bn else {}
    cached = _gather(dense, pruned, todo, data, opts, bias_step)
    if cached is None:
        return None
    return _pruned_pass(dense, pruned, todo, *cached, opts, norms, report)


__all__ = ["graph_norms", "live_peak_bytes", "nbytes", "reconstruct"]
