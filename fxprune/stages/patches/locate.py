"""Where PaPr patch selection goes in a traced, shape-recorded graph.

* ViTs (torchvision ``VisionTransformer``, timm ``vit_*`` / ``deit_*``): the patch-embedding convolution (a
  ``Conv2d`` on the image with ``stride == kernel_size``) gives the patch grid, and the token sequence is gathered
  right after the add of the position embedding (a ``(1, N, D)`` tensor) to the ``(B, N, D)`` tokens, where
  ``N = grid_h * grid_w + prefix`` and the prefix tokens (class, distillation) come first.
* Hierarchical models (Swin, ConvNeXt): no token is dropped. Each *channels-last MLP* (an optional LayerNorm, a
  ``Linear`` on a ``(B, H, W, C)`` map, pointwise activations / dropout, a second ``Linear``, trailing dropout and
  the LayerNorm of post-norm blocks) is run on the kept positions only. MLPs on parameters rather than on the
  image's features (Swin v2's position-bias MLP) are left alone.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import PlanError
from ...ir.spec import TensorSpec, spec_of

MAX_PREFIX = 16  # class + distillation + register tokens
_ADDS = (operator.add, torch.add)
_POINTWISE_MODULES = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU,
                      nn.Dropout, nn.Identity)
_POINTWISE_FUNCTIONS = (F.gelu, F.relu, F.silu, F.dropout, torch.relu, torch.tanh, torch.sigmoid)


@dataclass
class PatchGrid:
    """The patch-embedding convolution and the ``(grid_h, grid_w)`` grid it produces."""

    conv: fx.Node
    grid: tuple[int, int]


@dataclass
class TokenSite:
    """Gather the ``(B, N, D)`` output of ``node``: ``prefix`` leading tokens, then the patch grid."""

    node: fx.Node
    grid: tuple[int, int]
    prefix: int

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + self.prefix


@dataclass
class MlpRegion:
    """Nodes ``first .. last`` (in graph order) compute a per-position MLP of the ``(B, H, W, C)`` map ``source``
    (``flat``: of its ``(B, H * W, C)`` reshape, as timm's Swin runs its MLPs)."""

    first: fx.Node
    last: fx.Node
    source: fx.Node
    grid: tuple[int, int]
    flat: bool = False


def _shape(node: object) -> tuple[int, ...] | None:
    spec = spec_of(node)
    return tuple(spec.shape) if isinstance(spec, TensorSpec) else None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def find_patch_grid(gm: fx.GraphModule) -> PatchGrid:
    """The first ``Conv2d`` reading a graph input with ``stride == kernel_size`` (a patch embedding); failing that,
    a hybrid embedding (a CNN stem, as in timm's ``vit_*_r50_*``): the last ``Conv2d`` before the first ``(B, N, D)``
    tensor whose ``(B, D, h, w)`` output is those ``N = h * w`` tokens."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    last_conv: tuple[fx.Node, tuple[int, ...]] | None = None
    for node in gm.graph.nodes:
        m, shape = _module(gm, node), _shape(node)
        if isinstance(m, nn.Conv2d) and shape is not None and len(shape) == 4:
            if node.args and node.args[0] in inputs and m.stride == m.kernel_size:
                return PatchGrid(node, (shape[2], shape[3]))
            last_conv = (node, shape)
        elif shape is not None and len(shape) == 3 and last_conv is not None:
            conv, (_, width, h, w) = last_conv
            if shape[1] == h * w and shape[2] == width:
                return PatchGrid(conv, (h, w))
            if shape[1:] != (width, h * w):  # (B, D, N) is the flatten before the transpose to tokens
                break
    raise PlanError("no patch-embedding convolution found: expected a Conv2d reading the model's input with "
                    "stride == kernel_size (a ViT's patch embedding), or a CNN stem whose last Conv2d map becomes "
                    "the token sequence (a hybrid ViT)")


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")


def check_token_site(node: fx.Node, grid: PatchGrid) -> TokenSite:
    """``node`` as a token site: its output must be ``(B, N, D)`` with ``N - grid_h * grid_w`` prefix tokens."""
    shape = _shape(node)
    n_patches = grid.grid[0] * grid.grid[1]
    if shape is None or len(shape) != 3 or not 0 <= shape[1] - n_patches <= MAX_PREFIX:
        raise PlanError(f"{node.format_node()} does not produce a (B, N, D) token sequence with N = "
                        f"{grid.grid[0]}x{grid.grid[1]} patches + at most {MAX_PREFIX} prefix tokens (shape {shape})")
    return TokenSite(node, grid.grid, shape[1] - n_patches)


def downstream(node: fx.Node, follow: Callable[[fx.Node], bool] = lambda n: True) -> set[fx.Node]:
    """The nodes that use ``node``'s output, directly or through other nodes (``node`` itself excluded); the walk
    goes on through a user only where ``follow(user)`` holds (the user itself is still included)."""
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                if follow(user):
                    todo.append(user)
    return seen


def find_token_site(gm: fx.GraphModule, where: str = "auto") -> TokenSite:
    """The node whose output is the token sequence after patch + position embedding (or the node named ``where``)."""
    grid = find_patch_grid(gm)
    if where not in ("auto", "pos_embed"):
        named = {n.name: n for n in gm.graph.nodes}
        if where not in named:
            raise PlanError(f"no node named '{where}' in the graph (recipe 'where' names the node whose output is "
                            f"gathered)")
        return check_token_site(named[where], grid)
    after = downstream(grid.conv)
    for node in gm.graph.nodes:
        if node not in after or not _is_add(node):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        out = _shape(node)
        if len(args) != 2 or out is None or len(out) != 3:
            continue
        embeds = [a for a in args if a.op == "get_attr" and _shape(a) == (1, out[1], out[2])]
        if embeds:
            try:
                return check_token_site(node, grid)
            except PlanError:
                continue
    raise PlanError(f"no position embedding found after the patch embedding {grid.conv.format_node()}: expected an "
                    f"add of a (1, N, D) parameter to the (B, N, D) token sequence, N = {grid.grid[0]}x{grid.grid[1]} "
                    "patches + class tokens (pass the node to gather as recipe 'where')")


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), nn.Linear) or (node.op == "call_function" and node.target is F.linear)


def _is_layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), nn.LayerNorm) or (node.op == "call_function" and node.target is F.layer_norm)


def _is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _POINTWISE_MODULES)
    return node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


_FLATTENS = {"reshape", "view", "flatten"}


def _grid_of(node: fx.Node) -> tuple[int, int] | None:
    """``(H, W)`` of a channels-last ``(B, H, W, C)`` map, or of a ``(B, H * W, C)`` reshape of one."""
    shape = _shape(node)
    if shape is not None and len(shape) == 4:
        return shape[1], shape[2]
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if shape is None or len(shape) != 3 or name not in _FLATTENS or not isinstance(node.args[0], fx.Node):
        return None
    src = _shape(node.args[0])
    if src is not None and len(src) == 4 and src[0] == shape[0] and src[1] * src[2] == shape[1] and src[3] == shape[2]:
        return src[1], src[2]
    return None


def _same_positions(node: fx.Node, grid: tuple[int, int], flat: bool) -> bool:
    shape = _shape(node)
    if shape is None:
        return False
    return (len(shape) == 3 and shape[1] == grid[0] * grid[1]) if flat else (len(shape) == 4 and shape[1:3] == grid)


def _mlp_from(gm: fx.GraphModule, fc1: fx.Node) -> MlpRegion | None:
    """The MLP starting at the linear ``fc1`` (with the LayerNorm in front of it, if it feeds only ``fc1``)."""
    first = fc1
    pre = fc1.args[0] if fc1.args and isinstance(fc1.args[0], fx.Node) else None
    if pre is not None and _is_layer_norm(gm, pre) and _only_user(pre) is fc1 and isinstance(pre.args[0], fx.Node):
        first = pre
    source = first.args[0]
    grid = _grid_of(source)
    if grid is None:
        return None
    flat = len(_shape(source)) == 3
    node, seen_fc2, seen_post_norm = fc1, False, False
    while True:
        user = _only_user(node)
        if user is None or not _same_positions(user, grid, flat) or user.args[0] is not node:
            break
        if _is_linear(gm, user) and not seen_fc2:
            seen_fc2, node = True, user
        elif _is_layer_norm(gm, user) and seen_fc2 and not seen_post_norm:  # post-norm blocks (Swin v2)
            seen_post_norm, node = True, user
        elif _is_pointwise(gm, user):
            node = user
        else:
            break
    if not seen_fc2:
        return None
    return MlpRegion(first, node, source, grid, flat)


def find_mlp_regions(gm: fx.GraphModule) -> list[MlpRegion]:
    """Every channels-last MLP (``Linear`` on a ``(B, H, W, C)`` map, pointwise ops, ``Linear``) of the graph."""
    regions, used = [], set()
    from_input: set[fx.Node] = set()  # MLPs on parameters (Swin v2's position-bias MLP) are not per image
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        from_input |= downstream(p)
    for node in gm.graph.nodes:
        if node in used or node not in from_input or not _is_linear(gm, node):
            continue
        region = _mlp_from(gm, node)
        if region is None or region.source not in from_input:
            continue
        regions.append(region)
        cur = region.first
        while cur is not region.last:
            used.add(cur)
            cur = next(iter(cur.users))
        used.add(region.last)
    return regions


def find_region(gm: fx.GraphModule, first: str, last: str) -> MlpRegion:
    """The MLP region recorded in a plan as ``(first, last)`` node names; ``PlanError`` if it no longer fits."""
    named = {n.name: n for n in gm.graph.nodes}
    if first not in named or last not in named:
        raise PlanError(f"the plan gathers positions for nodes '{first}'..'{last}', which this graph does not have")
    region = _mlp_from(gm, named[first] if _is_linear(gm, named[first]) else next(iter(named[first].users)))
    if region is None or region.first.name != first or region.last.name != last:
        raise PlanError(f"nodes '{first}'..'{last}' are not a channels-last MLP in this graph")
    return region


__all__ = ["PatchGrid", "TokenSite", "MlpRegion", "find_patch_grid", "find_token_site", "check_token_site",
           "find_mlp_regions", "find_region", "MAX_PREFIX"]
