"""Optional (``attention: "gathered"``): the first block after the patch gather reads its packed qkv by index.

Instead of ``x_kept = gather(x)`` -> LayerNorm -> qkv ``Linear`` -> ``reshape(B, K, 3, H, D)`` -> SDPA, the first
block's LayerNorm and qkv projection run on the full sequence and ``fxprune::gathered_attention(qkv, idx)`` (the
fused-gather online-softmax Triton kernel on CUDA, gather + SDPA elsewhere) attends among the kept rows only, so no
gathered q / k / v copies are made. The residual stream is still gathered. The first block's LayerNorm and qkv
``Linear`` then see all ``N`` tokens instead of ``K`` (for ViT-B/16 at z = 0.5 about +1% MACs), so this is a
demonstration of the kernel in a real graph rather than a speed-up; every later block is unchanged.

It applies to timm-style attention: qkv ``Linear`` -> ``reshape(B, N, 3, H, D)`` -> ``permute(2, 0, 3, 1, 4)`` ->
``unbind(0)`` -> (``Identity`` q/k norms) -> ``scaled_dot_product_attention`` without mask or dropout.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import PlanError
from ...ir.spec import TensorSpec, spec_of
from ...trace import register_autowrap_function

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def gathered_attention_heads_first(qkv: torch.Tensor, idx: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``fxprune::gathered_attention`` as SDPA lays its result out: ``[B, N, 3, H, D]`` -> ``[B, H, K, D]``."""
    from fxprune.kernels.gathered_attention import gathered_attention

    return gathered_attention(qkv, idx, scale, check_indices=False).transpose(1, 2)


register_autowrap_function(gathered_attention_heads_first)  # one node when a pruned model is traced again


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _through_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    user = _only_user(node)
    while user is not None and user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Identity):
        node, user = user, _only_user(user)
    return node


def _no_mask(value: object, default: object) -> bool:
    if isinstance(value, fx.Node):
        return value.op == "placeholder" and value.args == (default,)
    return value == default


def _fail(kept: fx.Node, what: str) -> PlanError:
    return PlanError(f"attention 'gathered': after {kept.format_node()} expected the first block's timm-style "
                     f"attention (LayerNorm -> qkv Linear -> reshape(B, N, 3, H, D) -> permute -> unbind -> SDPA); "
                     f"{what}. Use attention 'sdpa' for this model")


def _after_per_token_modules(gm: fx.GraphModule, kept: fx.Node, idx: fx.Node) -> fx.Node:
    """Move ``kept = gather(site, idx)`` past single-user ``Identity`` / ``Dropout`` modules (timm's ``pos_drop``,
    ``patch_drop``, ``norm_pre``), which act per token; returns the gather that now feeds the first block."""
    site, node, user = kept.args[0], kept, _only_user(kept)
    while user is not None and user.op == "call_module" and isinstance(gm.get_submodule(user.target),
                                                                       (nn.Identity, nn.Dropout)):
        node, user = user, _only_user(user)
    if node is kept:
        return kept
    first = _only_user(kept)
    first.replace_input_with(kept, site)
    with gm.graph.inserting_after(node):
        moved = gm.graph.call_function(kept.target, (node, idx))
    node.replace_all_uses_with(moved, delete_user_cb=lambda u: u is not moved)
    gm.graph.erase_node(kept)
    return moved


def fuse_first_attention(gm: fx.GraphModule, site: fx.Node, kept: fx.Node, idx: fx.Node) -> tuple[dict, fx.Node]:
    """Rewrite the first attention after ``kept = gather_tokens(site, idx)``.

    Returns the plan-entry fields to record and the gather node that now feeds the first block.
    """
    kept = _after_per_token_modules(gm, kept, idx)
    full = kept.args[0]
    norms = [u for u in kept.users if (u.op == "call_function" and u.target is F.layer_norm) or (
        u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.LayerNorm))]
    if len(norms) != 1:
        raise _fail(kept, f"found {len(norms)} LayerNorms reading the kept tokens")
    norm = norms[0]
    linear = next((u for u in norm.users
                   if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Linear)), None)
    shapes = [u for u in norm.users if u.op == "call_function" and u.target is getattr and u.args[1] == "shape"]
    reshape = _only_user(linear) if linear is not None else None
    spec = spec_of(reshape) if reshape is not None else None
    if reshape is None or reshape.op != "call_method" or reshape.target not in ("reshape", "view") or not (
            isinstance(spec, TensorSpec) and len(spec.shape) == 5 and spec.shape[2] == 3):
        raise _fail(kept, "no qkv Linear reshaped to (B, N, 3, H, D)")
    permute = _only_user(reshape)
    unbind = _only_user(permute) if permute is not None else None
    if permute is None or permute.target != "permute" or tuple(permute.args[1:]) != (2, 0, 3, 1, 4) or \
            unbind is None or unbind.target != "unbind":
        raise _fail(kept, "the qkv tensor is not permuted to (3, B, H, N, D) and unbound")
    parts = {u.args[1]: _through_identity(gm, u) for u in unbind.users if u.target is operator.getitem}
    sdpa = _only_user(parts[0]) if len(parts) == 3 else None
    if sdpa is None or sdpa.op != "call_function" or sdpa.target not in _SDPA or \
            tuple(sdpa.args[:3]) != (parts[0], parts[1], parts[2]):
        raise _fail(kept, "q, k and v do not go straight into scaled_dot_product_attention")
    kw = sdpa.kwargs
    if len(sdpa.args) > 3 or not (_no_mask(kw.get("attn_mask"), None) and _no_mask(kw.get("is_causal"), False)
                                  and kw.get("dropout_p", 0.0) == 0.0):
        raise _fail(kept, f"{sdpa.format_node()} uses a mask, causal masking or dropout")
    # LayerNorm and qkv run on the full sequence; shapes read from the LayerNorm now read the kept tokens.
    norm.replace_input_with(kept, full)
    for shape in shapes:
        shape.replace_input_with(norm, kept)
    reshape.args = (reshape.args[0], reshape.args[1], -1, *reshape.args[3:])
    with gm.graph.inserting_before(sdpa):
        fused = gm.graph.call_function(gathered_attention_heads_first, (reshape, idx, kw.get("scale")))
    sdpa.replace_all_uses_with(fused)
    gm.graph.erase_node(sdpa)
    gm.graph.eliminate_dead_code()
    return {"attention": "gathered", "attention_node": fused.name}, kept


__all__ = ["fuse_first_attention", "gathered_attention_heads_first"]
