"""Tracing with torch.fx: leaf-module policy, readable trace errors and shape recording.

``trace`` turns a module into a ``GraphModule``; ``record_shapes`` runs example inputs through it and stores,
in ``node.meta["fxprune"]``, the shape of every tensor (or the plain value of a non-tensor result).
"""
from __future__ import annotations

import fnmatch
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .attribute_snapshot import restoring_attributes
from .errors import ExampleInputsError, TraceFailure
from .ir.spec import META, TensorSpec
from .ops import attention, hf_conv1d, timm_norm
from .ops.registry import has_module_rule

log = logging.getLogger(__name__)

# Extra leaf module types and wrapped functions, extended with ``register_leaf`` (e.g. by the timm integration).
_LEAF_TYPES: set[type] = set()
_AUTOWRAP_FUNCTIONS: set[Callable[..., Any]] = set()


def register_leaf(*types: type) -> None:
    """Make modules of these types leaves (called, never traced through) in every trace."""
    _LEAF_TYPES.update(types)


def register_autowrap_function(*fns: Callable[..., Any]) -> None:
    """Record these free functions as single graph nodes instead of tracing into them."""
    _AUTOWRAP_FUNCTIONS.update(fns)


def _static_length(node: fx.Node) -> int | None:
    """How many items a split-like node returns, when its arguments say so (``chunk(n)``, ``split([...])``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    kwargs = node.kwargs
    second = node.args[1] if len(node.args) > 1 else kwargs.get("chunks", kwargs.get("split_size_or_sections"))
    if name == "chunk" and isinstance(second, int):
        return second
    if name in ("split", "split_with_sizes", "tensor_split") and isinstance(second, (list, tuple)):
        return len(second) + (name == "tensor_split")
    return None


class SizedProxy(fx.Proxy):
    """The proxy of a split-like node with a static item count: ``list(x.chunk(2, 1))`` (YOLOv8's C2f) traces."""

    def __len__(self) -> int:
        return _static_length(self.node)

    def __iter__(self):  # type: ignore[override]
        return iter([self[i] for i in range(len(self))])


def _timm_notrace() -> tuple[set[type], set[Callable[..., Any]]]:
    """timm's own no-trace registries (modules kept whole, functions wrapped), when the user has imported timm."""
    if "timm" not in sys.modules:
        return set(), set()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # an old timm without the registries
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


class PruneTracer(fx.Tracer):
    """A tracer whose leaves are the modules fxprune has rules for, torch.nn modules, and user leaves.

    It remembers which module it is inside so a failure can name it.
    """

    def __init__(self, leaf_modules: Sequence[str] = (), autowrap_functions: Iterable[Callable] = (),
                 use_timm_registries: bool = False) -> None:
        timm_modules, timm_functions = _timm_notrace() if use_timm_registries else (set(), set())
        super().__init__(autowrap_functions=tuple(set(autowrap_functions) | _AUTOWRAP_FUNCTIONS | timm_functions))
        self.notrace_types = timm_modules
        self.leaf_patterns = tuple(leaf_modules)
        self.module_path: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        # Other proxies keep torch.fx's own iteration, which reads the caller's bytecode (tuple unpacking).
        return SizedProxy(node, self) if _static_length(node) is not None else super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if any(fnmatch.fnmatchcase(module_qualified_name, p) or type(m).__name__ == p for p in self.leaf_patterns):
            return True
        if type(m) in _LEAF_TYPES or type(m) in self.notrace_types or has_module_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if m is not self.root and self._built_in_forward(m):
            return forward(*args, **kwargs)
        self.module_path.append(self.path_of_module(m) if self.module_path or m is not self.root else "")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.module_path[-1]
            raise
        finally:
            self.module_path.pop()

    def _built_in_forward(self, m: nn.Module) -> bool:
        """``m`` is not a submodule of the root and holds no parameters or buffers (``nn.ReLU()(x)`` in a forward):
        its code is traced through, there is nothing of it to prune. One with parameters keeps torch.fx's error."""
        try:
            self.path_of_module(m)
        except NameError:
            return next(m.parameters(), None) is None and next(m.buffers(), None) is None
        return False


def _user_frame(exc: BaseException) -> str:
    """The last stack frame of the failure that is not inside torch itself."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/fxprune/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown location>"


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The plain module inside ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrappers, and the
    wrappers' names, outermost first (none for a plain module)."""
    wrappers = []
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model, name = model._orig_mod, "torch.compile"
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, name = model.module, type(model).__name__
        else:
            return model, wrappers
        wrappers.append(name)


def trace(model: nn.Module, leaf_modules: Sequence[str] = (), autowrap_functions: Iterable[Callable] = (),
          example_inputs: Any = None, strict: bool = False, stack_traces: bool = False) -> fx.GraphModule:
    """Symbolically trace ``model`` (which is not modified) into a ``GraphModule``.

    Plain torch.fx tracing is tried first. With ``example_inputs`` (a tensor, a tuple or a dict of keyword inputs),
    a model plain tracing cannot handle (or one called with keyword inputs, or through ``*args``/``**kwargs``) is
    captured with concrete metadata instead (``fxprune.capture``): its signature is bound to the inputs, Python
    decisions on shapes/dtypes/flags follow the example run and are guarded, and a submodule that still fails
    becomes a leaf automatically (unless ``strict``).

    The result shares submodules with ``model``: deep-copy the model first if the trace will be shrunk
    (``fxprune.compile`` does).

    Args:
        model: the module to trace.
        leaf_modules: module paths (glob patterns) or class names to keep as single, opaque calls.
        autowrap_functions: free functions to record as single nodes.
        example_inputs: the inputs the model will be run with (enables capture with concrete metadata).
        strict: with ``example_inputs``, raise on the first untraceable submodule instead of making it a leaf.
        stack_traces: record each node's source lines in ``node.stack_trace`` (``output="module"`` names them when
            it refuses a graph constant); the graph is the same either way.

    Raises:
        TraceFailure: naming the module and source line that broke tracing, and how to mark it as a leaf.
    """
    from .capture import capture, plain_signature
    from .defaults import unbound_defaults

    timm_norm.register()  # rules for timm's norm+act layers, which its no-trace registries keep whole
    hf_conv1d.register()  # transformers' Conv1D (GPT-2)
    attention.register_timm()  # timm's attention-mask helpers (manual attention path)
    if example_inputs is not None and not plain_signature(model, example_inputs):
        return capture(model, example_inputs, leaf_modules, autowrap_functions, strict, stack_traces)
    concrete = unbound_defaults(model, example_inputs) or None
    tracer = PruneTracer(leaf_modules, autowrap_functions)
    tracer.record_stack_traces = stack_traces
    try:
        graph = tracer.trace(model, concrete)
    except Exception as first:  # torch.fx raises many kinds of errors from user code
        graph, exc = None, first
        if _timm_notrace() != (set(), set()):  # retry keeping timm's no-trace modules whole (they stay unpruned)
            tracer = PruneTracer(leaf_modules, autowrap_functions, use_timm_registries=True)
            tracer.record_stack_traces = stack_traces
            try:
                graph = tracer.trace(model, concrete)
            except Exception as second:
                exc = second
    if graph is None and example_inputs is not None:
        log.debug("plain torch.fx tracing failed (%s); capturing with concrete metadata", exc)
        return capture(model, example_inputs, leaf_modules, autowrap_functions, strict, stack_traces)
    if graph is None:
        where = tracer.failed_in or ""
        if where:
            owner = f"module '{where}' ({type(model.get_submodule(where)).__name__})"
            hint = f"mark it as a leaf with recipe leaf_modules=['{where}']"
        else:
            owner = f"'{type(model).__name__}.forward'"
            hint = "mark the offending submodule as a leaf with recipe leaf_modules=[...]"
        raise TraceFailure(
            f"torch.fx could not trace {owner} at {_user_frame(exc)}: {type(exc).__name__}: {exc}. "
            f"torch.fx cannot follow data-dependent control flow or code outside modules; {hint} "
            f"(a leaf is kept unpruned)."
        ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    return gm


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(_spec(v) for v in value)
    if isinstance(value, (int, float, bool, str, torch.Size, type(None), torch.dtype, torch.device)):
        return value
    return None


class ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each node's ``TensorSpec`` (or plain value) in ``node.meta['fxprune']``."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ExampleInputsError(
                f"example_inputs do not run through the model: node {n.format_node()} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        n.meta[META] = _spec(result)
        return result


def _meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class MetaShapeRecorder(ShapeRecorder):
    """Records shapes on the meta device: parameters are swapped for meta tensors per call, nothing is computed."""

    # Shape-preserving modules whose meta kernels are slow Python decompositions: the output is the input's shape.
    SAME_SHAPE = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, self.SAME_SHAPE) and len(args) == 1 and not kwargs:
            return torch.empty_like(args[0])
        state = {n: _meta(t) for n, t in [*module.named_parameters(), *module.named_buffers()]}
        with restoring_attributes(module):  # a cache the module fills must not keep meta tensors
            return torch.func.functional_call(module, state, args, kwargs)

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)  # a 0-dim constant stays: meta ops take CPU scalars
        return value if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_meta else _meta(value)


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``example_inputs`` through ``gm`` without gradients and store shapes on its nodes; returns the output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if not (len(required) <= len(example_inputs) <= len(placeholders)):
        raise ExampleInputsError(
            f"the model's forward takes {len(required)}..{len(placeholders)} inputs "
            f"({', '.join(n.target for n in placeholders)}) but example_inputs has {len(example_inputs)}"
        )
    with torch.no_grad():
        try:  # shapes only: the meta device skips all arithmetic
            return MetaShapeRecorder(gm).run(*[_meta(x) for x in example_inputs])
        except Exception as exc:  # an op without a meta kernel, or a real error the real run reports
            log.debug("meta-device shape recording failed (%s); running for real", exc)
        return ShapeRecorder(gm).run(*example_inputs)
