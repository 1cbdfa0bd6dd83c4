"""Concrete-metadata tracing: every proxy carries the metadata of the example run.

``ConcreteTracer`` is a ``PruneTracer`` whose root takes exactly the bound example inputs and whose nodes each
hold a value computed on the meta device (shape, dtype; devices answer as the example's). When the model's
Python code turns a proxy into a Python value (``bool``, ``len``, ``iter``, ``int``, ``float``), the tracer answers
from that value and records a ``Decision`` (see ``guards``). Control flow on tensor *values* still fails: a meta
tensor has no data, so the module doing it can become a leaf (``leaves``).

The approach follows the idea of ``torch.fx.experimental.meta_tracer`` (values on the meta device) and of NNI's
concrete tracing (answers from an example run); the code is fxprune's own.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.proxy import Attribute, TraceError
from torch.utils._pytree import tree_map

from ..trace import PruneTracer, _static_length
from .guards import Decision, GuardSet, Read, _meta_read, _tensor_source, reads_of, source_line
from .outputs import flatten_output
from .signature import BoundInputs

MISSING = object()  # a node whose value could not be computed on the meta device
_SPLITS = ("chunk", "split", "split_with_sizes", "tensor_split")


_DATA_DEPENDENT = {"nonzero", "unique", "unique_consecutive", "masked_select", "argwhere", "bincount",
                   "repeat_interleave", "item", "tolist", "where", "nms", "batched_nms", "histc"}


def _on_meta(node: fx.Node, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments with every device replaced by the meta device (``x.to(x.device)``, ``arange(n, device=d)``):
    values live on the meta device, device queries answer the example's device."""
    def meta(v: Any) -> Any:
        return torch.device("meta") if isinstance(v, torch.device) else v

    args = tuple(meta(a) for a in args)
    kwargs = {k: ("meta" if k == "device" and v is not None else meta(v)) for k, v in kwargs.items()}
    if node.op == "call_method" and node.target == "to" and len(args) > 1 and isinstance(args[1], str):
        try:
            torch.device(args[1])
            args = (args[0], "meta", *args[2:])
        except RuntimeError:
            pass
    return args, kwargs


def _dtype(value: Any) -> torch.dtype:
    """A traced dtype's value (``torch.finfo(x.dtype)``)."""
    if not isinstance(value, torch.dtype):
        raise TraceError(f"expected a dtype, got {type(value).__name__}")
    return value


def _ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(type(v) is int for v in value)


def _to_meta(value: Any) -> Any:
    return tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) and not v.is_meta else v, value)


class ConcreteProxy(fx.Proxy):
    """A proxy whose Python conversions are answered from the example run (and recorded as decisions)."""

    def __getattr__(self, k: str) -> ConcreteAttribute:
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.decide_len(self)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[fx.Proxy]:
        return iter([self[i] for i in range(len(self))])  # type: ignore[index]

    def __index__(self) -> int:
        return self.tracer.decide_scalar(self, int)  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return self.tracer.decide_scalar(self, int)  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.decide_scalar(self, float)  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:  # y[:, 2::3] = y[:, 2::3].sigmoid(): an in-place node
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __contains__(self, item: Any) -> bool:
        return self.tracer.decide_scalar(self, lambda v: item in v)  # type: ignore[attr-defined]


class ConcreteAttribute(Attribute, ConcreteProxy):
    """``proxy.attr``: a lazily created ``getattr`` node (or a method call), with a value."""


class ConcreteTracer(PruneTracer):
    """Traces ``model``'s forward called with exactly the bound example inputs (see the module docstring).

    Buffers read as attributes are proxies too (``proxy_buffer_attributes``): ``self.position_ids[:, :seq_len]``
    with a traced ``seq_len`` is then a graph node, not a tensor sliced once at trace time, whose methods would
    refuse traced sizes (Hugging Face BERT's ``token_type_ids.expand(batch_size, seq_length)``)."""

    proxy_buffer_attributes = True

    def __init__(self, bound: BoundInputs, leaf_modules: tuple = (), auto_leaves: set[str] | None = None,
                 autowrap_functions: tuple = ()) -> None:
        super().__init__(leaf_modules, autowrap_functions)
        self.bound = bound
        self.auto_leaves = auto_leaves if auto_leaves is not None else set()
        self.values: dict[fx.Node, Any] = {}
        self.guards = GuardSet()
        self.out_spec: Any = None
        self.device = next((v.device for v in bound.values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self._ndims = {n: v.ndim for n, v in zip(bound.names, bound.values) if isinstance(v, torch.Tensor)}

    # -- root and leaves -------------------------------------------------------------------------------------
    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        placeholders = [self.create_proxy("placeholder", name, (), {}) for name in self.bound.names]
        forward = root_fn

        def root(module: nn.Module, *args: Any) -> Any:
            out, self.out_spec = flatten_output(self.bound.call(forward, module, args))
            return out

        return root, [self.root, *placeholders]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.auto_leaves or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """``fx.Tracer.trace`` with ``torch.finfo`` / ``torch.iinfo`` answering a traced dtype from the example run
        (a decision, like any other Python number): Hugging Face mask code writes ``torch.finfo(x.dtype).min``."""
        real = torch.finfo, torch.iinfo

        def answered(info: Any) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                return info(*[self.decide_scalar(a, _dtype) if isinstance(a, fx.Proxy) else a for a in args])
            return call

        torch.finfo, torch.iinfo = answered(real[0]), answered(real[1])  # type: ignore[misc, assignment]
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.finfo, torch.iinfo = real  # type: ignore[misc]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    # -- values ----------------------------------------------------------------------------------------------
    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            value = self.bound.values[self.bound.names.index(target)]
            self.values[node] = _to_meta(value)
        elif kind != "output":
            self.values[node] = self._compute(node)
        return node

    def _compute(self, node: fx.Node) -> Any:
        missing = []

        def value(n: fx.Node) -> Any:
            v = self.values.get(n, MISSING)
            if v is MISSING:
                missing.append(n)
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if missing:
            return MISSING
        if node.op in ("call_function", "call_method"):
            args, kwargs = _on_meta(node, args, kwargs)
        try:
            with torch.no_grad():
                if node.op == "get_attr":
                    return _to_meta(self._fetch(node.target))
                if node.op == "call_function":
                    if node.target is getattr and args[1] in ("device", "is_cuda", "is_cpu", "is_meta"):
                        return getattr(torch.empty(0, device=self.device), args[1])
                    return _to_meta(node.target(*args, **kwargs))
                if node.op == "call_method":
                    if node.target == "get_device":
                        return torch.empty(0, device=self.device).get_device()
                    return _to_meta(getattr(args[0], node.target)(*args[1:], **kwargs))
                if node.op == "call_module":
                    return self._run_leaf(self.root.get_submodule(node.target), args, kwargs)
        except Exception:  # an op without a meta kernel or that needs data
            return self._on_zeros(node, args, kwargs)
        return MISSING

    def _on_zeros(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """An op without a meta kernel, run on zeros of its inputs' shapes; ``MISSING`` for ops whose output shape
        depends on the data (their shape would be the zeros', not the example's)."""
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op not in ("call_function", "call_method") or name in _DATA_DEPENDENT:
            return MISSING
        real = tree_map(lambda v: torch.zeros(v.shape, dtype=v.dtype, device=self.device)
                        if isinstance(v, torch.Tensor) and v.is_meta else v, (args, kwargs))
        try:
            with torch.no_grad(), _maybe_revert_all_patches():
                if node.op == "call_function":
                    return _to_meta(node.target(*real[0], **real[1]))
                return _to_meta(getattr(real[0][0], node.target)(*real[0][1:], **real[1]))
        except Exception:  # unknown from here on: a decision on it fails and its module becomes a leaf
            return MISSING

    def _fetch(self, target: str) -> Any:
        prefix, _, name = target.rpartition(".")
        owner = self.root.get_submodule(prefix) if prefix else self.root
        for table in (owner._parameters, owner._buffers, owner._modules, owner.__dict__):
            if name in table:
                return table[name]
        raise AttributeError(target)

    def _run_leaf(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The leaf's output on the meta device; if it cannot run there, on zeros on the example device."""
        with _maybe_revert_all_patches():  # run the module's own code, not the tracer's patched calls
            return self._run_unpatched(module, args, kwargs)

    def _run_unpatched(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        state = {n: t.to("meta") for n, t in [*module.named_parameters(), *module.named_buffers()]}
        try:
            return torch.func.functional_call(module, state, args, kwargs)
        except Exception:
            real = tree_map(lambda v: torch.zeros(v.shape, dtype=v.dtype, device=self.device)
                            if isinstance(v, torch.Tensor) else v, (args, kwargs))
            training = module.training
            try:
                return _to_meta(module(*real[0], **real[1]))
            finally:
                module.train(training)

    # -- decisions -------------------------------------------------------------------------------------------
    def _value(self, proxy: fx.Proxy, what: str) -> Any:
        v = self.values.get(proxy.node, MISSING)
        if v is MISSING:
            raise TraceError(f"{what} of {proxy.node.format_node()} needs a value the meta-device run could "
                             f"not compute (an op without a meta kernel, or data-dependent code)")
        return v

    def _decide(self, proxy: fx.Proxy, what: str) -> None:
        self.guards.decisions.append(Decision(what, source_line(), reads_of(proxy.node, self._ndims)))

    def to_bool(self, obj: fx.Proxy) -> bool:
        v = self._value(obj, "bool()")
        if isinstance(v, torch.Tensor):
            raise TraceError(f"control flow on the value of tensor {obj.node.format_node()} (data-dependent; "
                             f"the example run has shapes only)")
        self._decide(obj, f"bool({obj.node.name})")
        return bool(v)

    def decide_scalar(self, obj: fx.Proxy, convert: Callable[[Any], Any]) -> Any:
        v = self._value(obj, "a Python number")
        if isinstance(v, torch.Tensor):
            raise TraceError(f"converting the value of tensor {obj.node.format_node()} to a Python number "
                             f"(data-dependent; the example run has shapes only)")
        self._decide(obj, f"{getattr(convert, '__name__', 'in')}({obj.node.name})")
        return convert(v)

    def decide_len(self, obj: fx.Proxy) -> int:
        v = self._value(obj, "len()")
        node = obj.node
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if isinstance(v, (tuple, list)) and not isinstance(v, torch.Size) and not _ints(v):
            if name not in _SPLITS and name != "unbind" or _static_length(node) is not None:
                return len(v)  # a structure fixed by the code that built it, not by shapes
        self.guards.decisions.append(Decision(f"len({node.name})", source_line(), self._len_reads(node, v)))
        return len(v)

    def _len_reads(self, node: fx.Node, v: Any) -> frozenset[Read]:
        if isinstance(v, torch.Tensor):
            src = _tensor_source(node)
            return frozenset() if src is False else frozenset({Read(src, "dim", 0) if src else Read(None, "shape")})
        if isinstance(v, torch.Size):
            meta = _meta_read(node)
            if meta is not None and meta[1] == "shape":
                src = _tensor_source(meta[0])
                return frozenset() if src is False else frozenset({Read(src or None, "ndim")})
        if _ints(v):  # shape arithmetic (x.size()[:-1] + (h, d)): its length follows the inputs' ndims
            return frozenset(Read(r.input, "ndim") if r.kind in ("dim", "shape") else r
                             for r in reads_of(node, self._ndims))
        return frozenset({Read(None, "shape")})

    def keys(self, obj: fx.Proxy) -> Any:
        v = self._value(obj, "**")
        return v.keys() if isinstance(v, dict) else super().keys(obj)

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter(obj)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
