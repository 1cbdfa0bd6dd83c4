"""``recover: [lstsq]``: refit every consumer layer by ridge least squares so that, reading only its kept inputs, it
reproduces the dense model's output at that layer (ThiNet / CATRO stage 2 / SparseGPT-style reconstruction).

For a consumer ``L`` with kept outputs ``O``: rows ``X`` are ``L``'s inputs in the *pruned* model (conv: im2col
patches; grouped conv: one regression per group; Linear: feature vectors), targets ``Y`` the dense model's output
of ``L`` on the same batch at the same positions, channels ``O``. The weights and a bias (added if the layer had
none) solve ``min ||[X, 1] W - Y||² + λ ||W - W0||²`` (``gram.py``).

When the calibration activations fit in ``cache_mb``, ``sequential.py`` does this in one dense and one pruned pass,
exactly sequentially. Otherwise (this module, the *streamed* mode, which holds no activation across batches),
layers go in topological order, by levels (``layers.py``): one streamed pass over ``data`` per band of levels runs
the dense model and the pruned model, whose earlier bands are already refit, up to the band's last layer, and
folds every batch into float64 Gram matrices; then the band's layers are solved and written. The band's first
level reads the pruned model's activations; deeper levels of the same band read the dense model's input at their
kept channels (what their refit upstream layers approximate). With ``passes=0`` each level is its own band (exact
sequential reconstruction); fewer passes trade fidelity for time. A BatchNorm right after a refit layer gets the
dense model's statistics back, since its input now approximates the dense one.
"""
from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed
from .bias import BiasCompensation, run_bias_step
from .capture import conv_columns, conv_targets, input_batches, linear_rows, run_watching
from .gram import Gram
from .layers import Consumer, bands

log = logging.getLogger(__name__)


@dataclass
class LstsqOptions:
    """Knobs of ``lstsq`` (the recipe form ``{"lstsq": {...}}`` sets them).

    ridge: λ relative to the mean diagonal of ``XᵀX`` (see the README: 1e-2 by default).
    cache_mb: the most MiB of calibration activations (inputs, targets, the pruned graph's live values) that may be
        held at once to reconstruct in one dense and one pruned pass (``sequential.py``, exactly sequential); over
        it, or with 0, the streamed passes below run instead.
    passes: streamed mode only: at most this many streamed passes (bands of levels); 0 = one per level, exactly
        sequential.
    positions: at most this many output positions (conv) or tokens (Linear) per sample enter the regression.
    max_columns: layers with more regression inputs than this (e.g. a Linear reading a 25088-wide flatten) keep
        their weights: their Gram matrix alone would take ``8 * max_columns²`` bytes.
    products: ``"float32"`` or ``"float64"``: the dtype of each chunk's Gram products; their sums over chunks,
        batches and ranks are float64 either way (``gram.py``). float32 is about 1.7x faster on CPU.
    """

    ridge: float = 1e-2
    cache_mb: int = 2048
    passes: int = 4
    positions: int = 128
    max_columns: int = 8192
    products: str = "float32"

    def gram(self, rows: torch.Tensor, y: torch.Tensor) -> Gram:
        """An empty ``Gram`` for rows ``[groups, R, n_in]`` and targets ``[groups, R, n_out]``."""
        return Gram(rows.shape[0], rows.shape[2], y.shape[2], rows.device, getattr(torch, self.products))


def columns_of(c: Consumer, m: nn.Module) -> int:
    """Regression inputs per group of consumer ``c`` (pruned module ``m``), bias excluded."""
    if c.kind == "linear":
        return m.in_features
    k = 1
    for s in m.kernel_size:
        k *= s
    return m.in_channels // m.groups * k


def current_weights(c: Consumer, m: nn.Module) -> torch.Tensor:
    """``W0`` ``[groups, n_in + 1, n_out / groups]`` of the pruned module, bias last (zeros if it has none)."""
    out = m.out_features if c.kind == "linear" else m.out_channels
    g = 1 if c.kind == "linear" else m.groups
    w = m.weight.detach().reshape(g, out // g, -1).transpose(1, 2)
    b = m.bias.detach() if m.bias is not None else torch.zeros(out, dtype=w.dtype, device=w.device)
    return torch.cat([w, b.reshape(g, 1, out // g)], 1)


def write_weights(c: Consumer, m: nn.Module, sol: torch.Tensor) -> None:
    """Store the solution ``[groups, n_in + 1, n_out / groups]`` in ``m``, adding a bias if it has none."""
    w = sol[:, :-1].transpose(1, 2).reshape(m.weight.shape)
    b = sol[:, -1].reshape(-1)
    with torch.no_grad():
        m.weight.copy_(w.to(m.weight.dtype))
        if m.bias is None:
            m.bias = nn.Parameter(b.to(m.weight.dtype).clone(), requires_grad=m.weight.requires_grad)
        else:
            m.bias.copy_(b.to(m.bias.dtype))


def restore_following_norms(dense: nn.Module, pruned: fx.GraphModule, c: Consumer) -> list[str]:
    """Give every BatchNorm that reads a call of ``c`` directly the dense model's running statistics (kept
    channels): once ``c`` is refit its output approximates the dense one, which those statistics describe, so
    layers further down see the activations they will see in the end. Returns the BatchNorm paths."""
    names = set(c.nodes)
    out = []
    for node in pruned.graph.nodes:
        if node.op != "call_module" or not node.args or getattr(node.args[0], "name", None) not in names:
            continue
        bn = pruned.get_submodule(str(node.target))
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.num_features != len(c.kept_out):
            continue
        ref = dense.get_submodule(str(node.target))
        keep = torch.as_tensor(c.kept_out, device=ref.running_mean.device)
        with torch.no_grad():
            bn.running_mean.copy_(ref.running_mean.index_select(0, keep))
            bn.running_var.copy_(ref.running_var.index_select(0, keep))
        out.append(str(node.target))
    return out


def input_rows(c: Consumer, m: nn.Module, x: torch.Tensor, cap: int) -> torch.Tensor:
    """Regression rows ``[groups, R, n_in]`` of consumer ``c`` (pruned module ``m``) on its input ``x``."""
    return linear_rows(x, cap) if c.kind == "linear" else conv_columns(m, x, cap)


def target_rows(c: Consumer, m: nn.Module, y: torch.Tensor, cap: int) -> torch.Tensor:
    """Regression targets ``[groups, R, kept_out / groups]``: the dense output ``y`` of ``c`` at the positions
    ``input_rows`` samples, kept output channels only."""
    out = torch.as_tensor(c.kept_out, device=y.device)
    return linear_rows(y, cap, out) if c.kind == "linear" else conv_targets(y, out, m.groups, cap)


def solve_and_write(dense: nn.Module, pruned: nn.Module, c: Consumer, gram: Gram, opts: LstsqOptions,
                    restore_norms: bool = True) -> dict:
    """Sum ``gram`` over ranks, solve it (ridge towards the current weights), write the solution into ``pruned``'s
    ``c`` and, with ``restore_norms``, give the BatchNorms right after it the dense statistics. Returns the
    layer's record (``path``, ``level``, ``rows``, ``after``; ``before`` when DEBUG logging is on)."""
    gram.reduce()
    m = pruned.get_submodule(c.path)
    w0 = current_weights(c, m)
    sol, residual = gram.solve(w0, opts.ridge)
    distributed.broadcast_([sol])  # the same bits on every rank, whatever each rank's BLAS did
    scale = float(gram.yy.sum()) or 1.0
    rec = {"path": c.path, "level": c.level, "after": residual / scale, "rows": int(gram.rows.item())}
    if log.isEnabledFor(logging.DEBUG):  # one more product with the Gram matrix
        rec["before"] = gram.error(w0) / scale
        log.debug("recover lstsq %s (level %d): relative error %.4g -> %.4g on %d rows", c.path, c.level,
                  rec["before"], rec["after"], rec["rows"])
    write_weights(c, m, sol)
    if restore_norms and isinstance(pruned, fx.GraphModule):
        restore_following_norms(dense, pruned, c)
    return rec


def _band_pass(dense: nn.Module, pruned: nn.Module, band: list[Consumer], data, opts: LstsqOptions,
               desc: str, bias_step: BiasCompensation | None = None) -> dict[str, Gram]:
    """One streamed pass for a band: Gram matrices of its layers. Layers of the band's first level read the pruned
    model's activations; deeper ones, whose inputs depend on layers refit in this same pass, read the dense model's
    input at their kept channels (what the refit upstream layers approximate)."""
    grams: dict[str, Gram] = {}
    pending: dict[str, deque] = defaultdict(deque)
    modules = {c.path: pruned.get_submodule(c.path) for c in band}
    first = min(c.level for c in band)
    sequential = [c for c in band if c.level == first]

    def add(c: Consumer, rows: torch.Tensor, y: torch.Tensor) -> None:
        if c.path not in grams:
            grams[c.path] = opts.gram(rows, y)
        grams[c.path].add(rows, y)

    def store(c: Consumer):
        m = modules[c.path]
        kept_in = torch.as_tensor(c.kept_in)

        def fn(x: torch.Tensor, y: torch.Tensor) -> None:
            target = target_rows(c, m, y, opts.positions)
            if c.level == first:
                pending[c.path].append(target)
            else:
                dim = x.dim() - 1 if c.kind == "linear" else 1
                add(c, input_rows(c, m, x.index_select(dim, kept_in.to(x.device)), opts.positions), target)
        return fn

    def fold(c: Consumer):
        def fn(x: torch.Tensor) -> None:
            add(c, input_rows(c, modules[c.path], x, opts.positions), pending[c.path].popleft())
        return fn

    calls = {c.path: c.calls for c in band}
    extra = {}
    if bias_step is not None:  # the bias step's statistics ride along on this dense pass
        calls.update(bias_step.calls)
        extra = bias_step.hooks()
    for inputs in input_batches(data, "recover 'lstsq'", desc):
        run_watching(dense, inputs, calls, on_input=extra, on_output={c.path: store(c) for c in band})
        run_watching(pruned, inputs, {c.path: c.calls for c in sequential},
                     on_input={c.path: fold(c) for c in sequential})
    return grams


def fittable(consumers: list[Consumer], pruned: nn.Module, opts: LstsqOptions) -> list[Consumer]:
    """The consumers ``lstsq`` refits: those with at most ``opts.max_columns`` regression inputs (a warning names
    each other one)."""
    todo = []
    for c in consumers:
        m = pruned.get_submodule(c.path)
        if columns_of(c, m) > opts.max_columns:
            log.warning("recover lstsq: %s has %d regression inputs (> max_columns %d); its weights stay", c.path,
                        columns_of(c, m), opts.max_columns)
            continue
        todo.append(c)
    return todo


def reconstruct(dense: nn.Module, pruned: nn.Module, consumers: list[Consumer], data,
                opts: LstsqOptions | None = None, bias_step: BiasCompensation | None = None) -> list[dict]:
    """Refit ``consumers`` of ``pruned`` towards ``dense`` (both in eval mode, no grad) in streamed passes (the
    mode that holds no activation across batches; ``sequential.py`` is the cached one); returns one record per layer
    (``path``, ``level``, ``rows``, relative squared error ``after`` on the calibration rows, and ``before`` when
    DEBUG logging is on).

    With ``bias_step`` (``recover: [bias, lstsq]``), the bias statistics are gathered on the first pass's dense run
    and applied before anything is solved: the same result as a pass of its own, one dense pass cheaper (the
    first band's layers read no refit or compensated layer)."""
    opts = opts or LstsqOptions()
    todo = fittable(consumers, pruned, opts)
    records = []
    groups = bands(todo, opts.passes)
    if bias_step is not None and not groups:  # nothing to refit: the bias step makes its own pass
        run_bias_step(bias_step, data)
    for k, band in enumerate(groups, 1):
        grams = _band_pass(dense, pruned, band, data, opts, f"recover lstsq pass {k}/{len(groups)}",
                           bias_step if k == 1 else None)
        if k == 1 and bias_step is not None:
            bias_step.apply()
        for c in band:
            gram = grams.pop(c.path, None)  # freed once solved
            if gram is not None:
                records.append(solve_and_write(dense, pruned, c, gram, opts))
    return records


__all__ = ["LstsqOptions", "current_weights", "fittable", "input_rows", "reconstruct", "solve_and_write", "target_rows",
           "write_weights"]
