"""Automatic partial graphs: trace with concrete metadata, and make each submodule that still fails a leaf.

``capture`` traces the model's forward bound to the example inputs (``ConcreteTracer``). When tracing fails
inside a submodule (value-dependent control flow, NMS, Python-side data structures), that innermost submodule
becomes an opaque leaf (kept unpruned, its inputs and outputs frozen) and tracing starts again: a child that
traces is never swallowed by its parent's leaf. Each leaf is logged and noted (module path, source line,
reason). With ``strict`` the first failure raises ``TraceFailure`` instead.

Tracing runs the model's Python code, which may cache what it computes on its modules (Ultralytics' ``Detect``
stores its anchors and the input shape); every attribute left holding a proxy or a meta tensor is restored.
"""
from __future__ import annotations

import logging
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceFailure
from .concrete import ConcreteTracer
from .guards import guard_nodes, short_path
from .outputs import attach_structure
from .shapes import spell_out_shapes
from .signature import bind_inputs

log = logging.getLogger(__name__)
CAPTURE_META = "fxprune_capture"
_MAX_LEAVES = 64


@dataclass(frozen=True)
class LeafNote:
    """A submodule made a leaf because it could not be traced."""

    path: str
    type: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"auto leaf '{self.path}' ({self.type}) at {self.where}: {self.reason}"


@dataclass
class CaptureInfo:
    """How a model was captured: its graph inputs, automatic leaves and guards (``gm.meta['fxprune_capture']``)."""

    inputs: tuple[str, ...]
    leaves: list[LeafNote] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)  # one line per decision that pinned input metadata

    def lines(self) -> list[str]:
        return [str(n) for n in self.leaves] + [f"guard: {g}" for g in self.guards]


def _user_frame(exc: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in frame.filename and "/fxprune/" not in frame.filename:
            return f"{short_path(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown location>"


def _snapshot(model: nn.Module) -> dict[nn.Module, dict[str, Any]]:
    """Each module's attributes, with dict values copied one level (caches mutated in place)."""
    return {m: {k: (v.copy() if type(v) in (dict, OrderedDict) else v) for k, v in m.__dict__.items()}
            for m in model.modules()}


def _tainted(value: Any, depth: int = 0) -> bool:
    """Whether a value holds a proxy or a meta tensor (something tracing computed), up to three levels deep."""
    if isinstance(value, fx.Proxy) or isinstance(value, torch.Tensor) and value.is_meta:
        return True
    if depth < 3 and isinstance(value, (tuple, list, set)):
        return any(_tainted(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(_tainted(v, depth + 1) for v in value.values())
    return False


def _restore(snapshot: dict[nn.Module, dict[str, Any]]) -> None:
    """Undo what tracing cached on the modules: every attribute (or dict entry) now holding a proxy or a meta
    tensor gets its old value back (or is removed). Other changes stay: hooks or flags the model's code installs
    on a first call are what an eager first call installs too."""
    for m, old in snapshot.items():
        now = m.__dict__
        for key in list(now):
            value = now[key]
            if type(value) in (dict, OrderedDict) and type(old.get(key)) is type(value):
                for k in [k for k, v in value.items() if _tainted(v)]:
                    if k in old[key]:
                        value[k] = old[key][k]
                    else:
                        del value[k]
            elif _tainted(value):
                if key in old:
                    now[key] = old[key]
                else:
                    del now[key]


def _failure(model: nn.Module, where: str, exc: BaseException, strict: bool) -> TraceFailure:
    owner = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else \
        f"'{type(model).__name__}.forward'"
    hint = (f"mark it as a leaf with recipe leaf_modules=['{where}'] (or drop strict_trace to do so automatically)"
            if where and strict else "mark the offending submodule as a leaf with recipe leaf_modules=[...]")
    return TraceFailure(f"fxprune could not trace {owner} at {_user_frame(exc)}: {type(exc).__name__}: {exc}. "
                        f"Tracing follows shapes, dtypes and flags of the example run but not tensor values; {hint} "
                        f"(a leaf is kept unpruned).")


_PURE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex", "get_device",
                 "is_contiguous", "element_size"}
_MUTATING_OPERATORS = {"setitem", "delitem"}


def _pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return True
        name = getattr(node.target, "__name__", "")
        return getattr(node.target, "__module__", None) == "_operator" and not name.startswith("i") \
            and name not in _MUTATING_OPERATORS
    return False


def drop_dead_metadata(graph: fx.Graph) -> None:
    """Erase the unused metadata reads and comparisons the traced decisions left behind (``x.shape[1] != 3``)."""
    for node in reversed(list(graph.nodes)):
        if not node.users and _pure(node):
            graph.erase_node(node)


def capture(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[str] = (),
            autowrap_functions: Iterable[Callable] = (), strict: bool = False,
            stack_traces: bool = False) -> fx.GraphModule:
    """Trace ``model`` (not modified) bound to ``example_inputs`` with concrete metadata; see the module docstring.

    The result checks its guards on every call and carries ``CaptureInfo`` in ``gm.meta['fxprune_capture']``.
    """
    bound = bind_inputs(model, example_inputs)
    auto: set[str] = set()
    notes: list[LeafNote] = []
    while True:
        tracer = ConcreteTracer(bound, tuple(leaf_modules), auto, tuple(autowrap_functions))
        tracer.record_stack_traces = stack_traces  # source lines on the nodes (``output="module"`` refusals)
        state = _snapshot(model)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # the user's code raises anything under tracing
            where = tracer.failed_in or ""
            if strict or not where or where in auto or len(auto) >= _MAX_LEAVES:
                raise _failure(model, where, exc, strict) from exc
            note = LeafNote(where, type(model.get_submodule(where)).__name__, _user_frame(exc),
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.warning("%s; it is kept whole (unpruned) and the rest of the model is traced", note)
            auto.add(where)
            notes.append(note)
        finally:
            _restore(state)
    spell_out_shapes(graph, tracer.values)
    drop_dead_metadata(graph)
    attach_structure(graph, tracer.out_spec)
    inputs = dict(zip(bound.names, bound.values))
    tracer.guards.insert(graph, inputs)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    lines = [f"{d.what} at {d.where}" for d in tracer.guards.decisions if d.reads]
    gm.meta[CAPTURE_META] = CaptureInfo(bound.names, notes, lines)
    log.debug("captured %s: %d auto leaves, %d guard nodes", type(model).__name__, len(notes),
              len(guard_nodes(graph)))
    return gm


def capture_info(gm: Any) -> CaptureInfo | None:
    """The ``CaptureInfo`` of a captured ``GraphModule`` (``None`` for a plain torch.fx trace)."""
    meta = getattr(gm, "meta", None)
    return meta.get(CAPTURE_META) if isinstance(meta, dict) else None


def capture_lines(gm: Any) -> list[str]:
    """Report lines of a captured ``GraphModule``: its automatic leaves and guards (none for a plain trace)."""
    info = capture_info(gm)
    return info.lines() if info is not None else []
