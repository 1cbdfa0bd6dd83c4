"""Attention ops: ``F.scaled_dot_product_attention`` and batched matmuls (timm's manual attention path).

For ``sdpa(q, k, v)`` with q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)`` and output ``(..., L, Ev)``:

* the leading (batch, head) dims of q, k, v and the output are tied slot for slot, so a head is one unit;
* q and k are tied on ``E`` (a zeroed index adds nothing to q·k), and v's ``Ev`` flows to the output;
* the query tokens ``L`` pass to the output; the key/value tokens ``S`` are frozen (a zeroed key still takes
  softmax weight, so removing it is not the same as masking it).

When ``E`` shrinks, the rewrite pins ``scale=`` to the original ``1/sqrt(E)`` so that shrunk ≡ masked.

A reshape that splits ``3·H·D`` into ``(3, H, D)`` (or merges ``(H, D)`` back into ``H·D``) can carry channels
through only one factor. ``head_factor_hint`` (registered with the reshape rule) picks the factor that reaches an
attention op's head dim, so whole heads are the units and the ``num_heads`` constant is rewritten. A unit cannot be
both "head h" and "feature d of every head", so head-dim pruning of packed ``qkv`` layouts analyses the graph again
with the analysis option ``{"qkv_factor": "head_dim"}`` (the ``head_dim`` stage, ``fxprune/stages/head_dim.py``).
``nn.MultiheadAttention`` (``attention_mha.py``) keeps heads and head dims as separate internal axes, so channel
stages prune both.
"""
from __future__ import annotations

import math
import operator
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Port, Space
from ..ir.spec import TensorSpec, spec_of
from .registry import OpRule, arg, register_functions, register_op
from .reshape import register_factor_hint

KEY_TOKENS_REASON = "key/value tokens of attention (a removed key would still take softmax weight)"
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__")


def _port(arg_: Any) -> Port | None:
    spec = spec_of(arg_)
    return Port(arg_.name, 0, spec.shape) if isinstance(spec, TensorSpec) else None


def head_dim_of(ndim: int) -> int | None:
    """The head dim of an attention operand with ``ndim`` dims: ``(B, H, N, D)`` layouts, else ``None``."""
    return ndim - 3 if ndim >= 4 else None


@register_op(F.scaled_dot_product_attention)
class SdpaRule(OpRule):
    """``F.scaled_dot_product_attention``: heads and head dims prunable, key tokens frozen."""

    name = "sdpa"

    def _qkv(self, node: fx.Node) -> tuple[Any, Any, Any]:
        return arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")

    def couple(self, node: fx.Node, c: Coupling) -> None:
        q, k, v = (c.port(a) for a in self._qkv(node))
        y = c.out()
        if q is None or k is None or v is None or y is None or not q.ndim == k.ndim == v.ndim == y.ndim:
            return
        n = q.ndim
        for d in range(n - 2):  # batch and head dims (GQA's unequal head counts stay frozen)
            for other in (k, v, y):
                c.tie_dims(q, d, other, d)
        c.tie_dims(q, n - 2, y, n - 2)
        c.tie_dims(q, n - 1, k, n - 1)
        c.tie_dims(v, n - 1, y, n - 1)
        c.freeze(k.space(n - 2), KEY_TOKENS_REASON)
        c.freeze(v.space(n - 2), KEY_TOKENS_REASON)
        mask = c.port(arg(node, 3, "attn_mask"))
        if mask is not None:  # broadcast onto (..., L, S): leading dims and L pass, S is frozen
            off = n - mask.ndim
            for d in range(mask.ndim - 2):
                if mask.shape[d] > 1:
                    c.tie_dims(mask, d, y, d + off)
            if mask.shape[-2] > 1:
                c.tie_dims(mask, mask.ndim - 2, q, n - 2)

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The spaces whose slots are whole attention heads (used by the ``heads`` stage)."""
        q = _port(self._qkv(node)[0])
        h = head_dim_of(q.ndim) if q is not None else None
        return [q.space(h)] if h is not None else []

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        """The per-head feature dims of queries/keys and of values (used by the ``head_dim`` stage)."""
        ports = [_port(a) for a in self._qkv(node)]
        return [p.space(-1) for p in (ports[0], ports[2]) if p is not None and p.ndim >= 4]

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        q = self._qkv(node)[0]
        spec = spec_of(q)
        if not isinstance(q, fx.Node) or not isinstance(spec, TensorSpec):
            return
        if r.kept(Space(q.name, 0, len(spec.shape) - 1)) is not None and arg(node, 6, "scale") is None:
            # pin the softmax temperature to the original head dim: shrunk == masked
            node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(spec.shape[-1])}

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        q, k, v = self._qkv(node)
        if not all(isinstance(t, fx.Node) for t in (q, k, v)):
            return 0
        qs, ks, vs = s.shape(q), s.shape(k), s.shape(v)
        batch = math.prod(s.shape(node)[:-2])
        return batch * qs[-2] * ks[-2] * (qs[-1] + vs[-1])


@register_op(*MATMUL_TARGETS)
class MatmulRule(OpRule):
    """``a @ b`` with both operands at least 2-D: batch dims broadcast, ``a``'s rows and ``b``'s columns pass to
    the output, and the contracted dim of ``a`` is tied to that of ``b`` (a zeroed term adds nothing)."""

    name = "matmul"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        a, b, y = c.port(node.args[0]), c.port(node.args[1]), c.out()
        if a is None or b is None or y is None or a.ndim < 2 or b.ndim < 2:
            return
        for x in (a, b):
            off = y.ndim - x.ndim
            for d in range(x.ndim - 2):
                if x.shape[d] > 1:
                    c.tie_dims(x, d, y, d + off)
        c.tie_dims(a, a.ndim - 2, y, y.ndim - 2)
        c.tie_dims(b, b.ndim - 1, y, y.ndim - 1)
        c.tie_dims(a, a.ndim - 1, b, b.ndim - 2)

    def head_spaces(self, node: fx.Node) -> list[Space]:
        a = _port(node.args[0])
        h = head_dim_of(a.ndim) if a is not None else None
        return [a.space(h)] if h is not None else []

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        ports = [_port(x) for x in node.args[:2]]
        return [p.space(-1) for p in ports if p is not None and p.ndim >= 4]

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        a = node.args[0]
        if not isinstance(a, fx.Node) or not isinstance(spec_of(node), TensorSpec):
            return 0
        return math.prod(s.shape(node)) * s.shape(a)[-1]


class ScoresShapeRule(OpRule):
    """timm's ``resolve_self_attn_mask(N, scores, mask, is_causal)``: reads the scores only for their dtype and
    device (every slot free); the mask it returns, if any, keeps its shape."""

    name = "attention_mask"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        scores = c.port(arg(node, 1, "attn"))
        for d in range(scores.ndim if scores is not None else 0):
            c.free(scores.space(d))


_TIMM_DONE: list[bool] = []


def register_timm() -> None:
    """Rules for the mask helpers of timm's manual attention path (single graph nodes); once, if timm is imported."""
    if _TIMM_DONE or "timm" not in sys.modules:
        return
    _TIMM_DONE.append(True)
    try:
        from timm.layers import attention as timm_attention
    except ImportError:  # a timm without these helpers
        return
    from .elementwise import ElementwiseRule

    add = getattr(timm_attention, "maybe_add_mask", None)
    if add is not None:
        register_functions(ElementwiseRule, [add])  # scores + mask, or scores when the mask is None
    resolve = getattr(timm_attention, "resolve_self_attn_mask", None)
    if resolve is not None:
        register_op(resolve)(ScoresShapeRule)


# -- which factor of a reshape is the heads factor ----------------------------------------------------------------
_ATTENTION = (F.scaled_dot_product_attention, *MATMUL_TARGETS)
_MAX_DEPTH = 8
#: the analysis option naming the factor packed-``qkv`` reshapes carry channels through: ``"heads"`` (default) or
#: ``"head_dim"`` (the ``head_dim`` stage analyses with ``{QKV_FACTOR: "head_dim"}``)
QKV_FACTOR = "qkv_factor"
QKV_FACTORS = ("heads", "head_dim")


def preferred_factor(options: Mapping[str, Any]) -> str:
    """The packed-``qkv`` factor the analysis ``options`` prefer: ``"heads"`` or ``"head_dim"``."""
    kind = options.get(QKV_FACTOR, "heads")
    if kind not in QKV_FACTORS:
        raise ValueError(f"analysis option {QKV_FACTOR!r} must be 'heads' or 'head_dim', got {kind!r}")
    return str(kind)


def _wanted(user: fx.Node, node: fx.Node, dim: int, ndim: int, factor: str) -> bool:
    """Whether ``node``'s dim ``dim`` is, at the attention op ``user``, the preferred ``factor``."""
    if factor == "heads":
        return dim == head_dim_of(ndim)
    if ndim < 4:
        return False
    return dim == ndim - 1 or (user.target in MATMUL_TARGETS and user.args[1] is node and dim == ndim - 2)


def _is_attention(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ATTENTION


def _shape(node: Any) -> tuple[int, ...] | None:
    spec = spec_of(node)
    return spec.shape if isinstance(spec, TensorSpec) else None


def _perm(node: fx.Node, ndim: int) -> list[int] | None:
    """Output dim i of a permute/transpose node is input dim ``perm[i]``."""
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return [int(d) % ndim for d in dims]
    if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        perm = list(range(ndim))
        d0, d1 = int(node.args[1]) % ndim, int(node.args[2]) % ndim
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    return None


def _reaches_heads(node: fx.Node, dim: int, factor: str, depth: int = 0) -> bool:
    """Whether dim ``dim`` of ``node``'s output flows (through layout and same-shape ops) into an attention op's
    head dim."""
    if depth > _MAX_DEPTH:
        return False
    shape = _shape(node)
    for user in node.users:
        if _is_attention(user):
            if node in user.args[:3] and shape is not None and _wanted(user, node, dim, len(shape), factor):
                return True
            continue
        if shape is None:  # a tuple (unbind/chunk): its getitems keep the dim
            if user.target is operator.getitem and _reaches_heads(user, dim, factor, depth + 1):
                return True
            continue
        perm = _perm(user, len(shape)) if user.op in ("call_method", "call_function") else None
        if perm is not None:
            if _reaches_heads(user, perm.index(dim), factor, depth + 1):
                return True
        elif user.target in ("unbind", torch.unbind):
            u = int(arg(user, 1, "dim", 0)) % len(shape)
            if u != dim and _reaches_heads(user, dim - (dim > u), factor, depth + 1):
                return True
        elif user.target in ("chunk", "split", torch.chunk, torch.split):
            if _reaches_heads(user, dim, factor, depth + 1):
                return True
        elif _shape(user) == shape and _reaches_heads(user, dim, factor, depth + 1):
            return True
    return False


def _comes_from_heads(node: Any, dim: int, factor: str, depth: int = 0) -> bool:
    """Whether dim ``dim`` of ``node``'s output comes (through layout and same-shape ops) from an attention op's
    head dim."""
    shape = _shape(node)
    if depth > _MAX_DEPTH or not isinstance(node, fx.Node) or shape is None:
        return False
    if _is_attention(node):
        return dim == (head_dim_of(len(shape)) if factor == "heads" else len(shape) - 1)
    perm = _perm(node, len(shape)) if node.op in ("call_method", "call_function") else None
    if perm is not None:
        return _comes_from_heads(node.args[0], perm[dim], factor, depth + 1)
    src = node.args[0] if node.args else None
    return _shape(src) == shape and _comes_from_heads(src, dim, factor, depth + 1)


@register_factor_hint
def head_factor_hint(node: fx.Node, splits: bool, dim: int, options: Mapping[str, Any]) -> bool:
    """Prefer the reshape factor that is an attention head dim, or with the analysis option
    ``{"qkv_factor": "head_dim"}`` the per-head feature dim (``splits``: ``dim`` is on the output, else on the
    input)."""
    factor = preferred_factor(options)
    return _reaches_heads(node, dim, factor) if splits else _comes_from_heads(node.args[0], dim, factor)


__all__ = ["SdpaRule", "MatmulRule", "ScoresShapeRule", "register_timm", "head_factor_hint", "preferred_factor",
           "QKV_FACTOR", "QKV_FACTORS", "head_dim_of", "KEY_TOKENS_REASON"]
