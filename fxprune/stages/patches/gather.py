"""``GatherPatches``: PaPr patch pruning (arXiv 2403.16020) as a graph rewrite.

A proposal ConvNet (a submodule ``papr`` of the ``GraphModule``) reads the model's input image; the channel mean of
its last feature map, resized bicubically (``align_corners=True``) to a token grid, picks the kept patches.

* ``mode: "tokens"`` (ViTs): the ``(B, N, D)`` sequence after patch + position embedding is gathered to ``k =
  int(N * keep)`` tokens (``N`` counts the class token, which is always kept); every later node runs on the shorter
  sequence. Graph constants equal to ``N`` in shape arguments and comparisons downstream become ``k``.
* ``mode: "mlp"`` (Swin, ConvNeXt): no token is dropped; each channels-last MLP runs on the kept positions of its
  stage's grid (``int(H * W * keep)`` of them) and writes zeros elsewhere (gather -> MLP -> scatter).

The plan entry (``{"pass": "patches", ...}``) records keep, the proposal's name, the mode and the rewritten nodes, so
``fxprune.load`` replays it; the proposal's weights are part of the state dict.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ...errors import ExampleInputsError, PlanError, RewriteError
from ...ir.spec import TensorSpec, spec_of
from ...passes.replay import register_rewrite
from ...trace import record_shapes
from .fuse_attention import fuse_first_attention
from .locate import (
    MAX_PREFIX,
    MlpRegion,
    TokenSite,
    check_token_site,
    downstream,
    find_mlp_regions,
    find_patch_grid,
    find_region,
    find_token_site,
)
from .proposal import build_proposal, proposal_feature_shape
from .select import PatchSignificance, gather_positions, gather_tokens, keep_count, scatter_positions, select_tokens

log = logging.getLogger(__name__)

SUBMODULE = "papr"
MODES = ("tokens", "mlp")
_SHAPE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full", "unflatten",
                  "repeat", "tile"}
_RESHAPES = {"view", "reshape", "expand", "unflatten", "repeat", "tile", torch.reshape, torch.unflatten,
             torch.broadcast_to}  # sizes of their tensor input: rewritten only where that input carries tokens
_SHAPE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.unflatten,
                    torch.broadcast_to, operator.eq, operator.ne}


def _anchor_inserter(graph: fx.Graph, anchor: fx.Node):
    """``add(op, target, args)`` appends nodes one after another, starting right after ``anchor``."""
    state = {"last": anchor}

    def add(op: str, target: Any, args: tuple) -> fx.Node:
        with graph.inserting_after(state["last"]):
            node = graph.create_node(op, target, args)
        state["last"] = node
        return node

    return add


def _replace_length(value: Any, old: int, new: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return value
    if isinstance(value, int):
        return new if value == old else value
    return type(value)(_replace_length(v, old, new) for v in value)


def _sizes(node: fx.Node) -> list:
    """The size arguments of a shape op, flattened (``view(b, n, d)`` and ``view((b, n, d))`` alike)."""
    rest = list(node.args[1:]) if node.op == "call_method" or node.target in (torch.reshape, torch.broadcast_to) \
        else list(node.args)
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def rewrite_sequence_length(node: fx.Node, old: int, new: int) -> None:
    """Replace the constant sequence length ``old`` by ``new`` in a shape op or comparison downstream of the gather.

    Where the op's sizes line up with its recorded output shape, the first dim that held ``old`` is the token dim
    (tokens come before features in ``(B, N, D)``, ``(B, N, 3, H, D)`` and ``(B, H, N, D)`` layouts): its size
    changes if it is the constant ``old``, and nothing changes if it is computed at run time (``x.shape[1]``, ``-1``),
    so a head or hidden width that happens to equal ``old`` is left alone either way."""
    spec = spec_of(node)
    sizes = _sizes(node) if node.target not in (operator.eq, operator.ne) else []
    if isinstance(spec, TensorSpec) and len(sizes) == len(spec.shape) and all(
            isinstance(v, (int, fx.Node)) and not isinstance(v, bool) for v in sizes):
        if any(isinstance(v, fx.Node) for v in sizes[1:]):
            return  # the op reads a size past the batch at run time: that is the token count, nothing to rewrite
        token_dim = next(i for i, size in enumerate(spec.shape) if size == old) if old in spec.shape else None
        at = [token_dim] if token_dim is not None and isinstance(sizes[token_dim], int) and sizes[token_dim] == old \
            else []
        fixed = [new if i in at else v for i, v in enumerate(sizes)]
        grouped = len(node.args) - (1 if node.op == "call_method" or node.target in (torch.reshape, torch.broadcast_to)
                                    else 0) == 1 and isinstance(node.args[-1], (list, tuple))
        head = node.args[: len(node.args) - 1] if grouped else node.args[: len(node.args) - len(sizes)]
        node.args = (*head, type(node.args[-1])(fixed)) if grouped else (*head, *fixed)
        return
    node.args = _replace_length(node.args, old, new)
    node.kwargs = {key: _replace_length(v, old, new) for key, v in node.kwargs.items()}


def _carries_tensors(spec: Any) -> bool:
    return isinstance(spec, TensorSpec) or (isinstance(spec, tuple) and any(_carries_tensors(v) for v in spec))


def _carried(node: fx.Node) -> set[fx.Node]:
    """Nodes that take tensors computed from ``node``'s output, through tensor edges only: a shape read
    (``x.shape[0]``) is included, what is computed from the size it reads is not."""
    return downstream(node, lambda user: _carries_tensors(spec_of(user)))


def _longer_sequences(carried: set[fx.Node], n: int) -> set[int]:
    """Sequence lengths ``n + e`` (``e`` <= ``MAX_PREFIX``) of ``(B, N, D)`` tensors computed from the gathered
    tokens: prefix tokens concatenated after the gather site."""
    shapes = [tuple(spec_of(c).shape) for c in carried if isinstance(spec_of(c), TensorSpec)]
    return {s[1] for s in shapes if len(s) == 3 and n < s[1] <= n + MAX_PREFIX}


def _in_order(node: fx.Node) -> list[fx.Node]:
    later = downstream(node)
    return [n for n in node.graph.nodes if n in later]


class GatherPatches(PassBase):
    """Insert PaPr patch selection into a traced, shape-recorded graph as ``entry`` says.

    Args:
        entry: ``{"pass": "patches", "keep": z, "proposal": name, "attention": "sdpa" | "gathered"}`` plus, from a
            stage, ``"where"`` (``auto``,
            ``pos_embed``, ``mlp`` or a node name), or, from a plan, the resolved ``"mode"`` and ``"node"`` /
            ``"regions"`` (then nothing is searched for again).
        example_inputs: the inputs whose shapes were recorded; ``ensures`` re-runs them.
        weights: where the proposal's weights come from (``fxprune.stages.patches.build_proposal``); not part of
            the entry.

    After ``__call__``, ``self.entry`` is the resolved, JSON-able plan entry.
    """

    def __init__(self, entry: dict, example_inputs: Sequence[Any], weights: str | None = None) -> None:
        self.entry = dict(entry)
        self.weights = weights
        self.example_inputs = tuple(example_inputs)
        self.site: TokenSite | None = None
        self.regions: list[MlpRegion] = []
        self.kept: fx.Node | None = None
        self.before: Any = None

    # -- requires ------------------------------------------------------------------------------------------------
    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, SUBMODULE):
            raise PlanError(f"the graph already has a '{SUBMODULE}' submodule: patches can be selected only once")
        keep = self.entry.get("keep")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise PlanError(f"patches: keep must be in (0, 1], got {keep!r}")
        mode = self.entry.get("mode")
        if mode is None:
            self._locate(gm, self.entry.get("where", "auto"))
        elif mode == "tokens":
            named = {n.name: n for n in gm.graph.nodes}
            if self.entry.get("node") not in named:
                raise PlanError(f"the plan gathers tokens after node {self.entry.get('node')!r}, which this graph "
                                "lacks")
            self.site = check_token_site(named[self.entry["node"]], find_patch_grid(gm))
            if [*self.site.grid] != list(self.entry.get("grid", [])) or self.site.prefix != self.entry.get("prefix"):
                raise PlanError(f"the plan expects a {self.entry.get('grid')} patch grid and "
                                f"{self.entry.get('prefix')} prefix tokens at '{self.site.node.name}', the graph has "
                                f"{list(self.site.grid)} and {self.site.prefix}")
        elif mode == "mlp":
            self.regions = [find_region(gm, first, last) for first, last in self.entry.get("regions", [])]
        else:
            raise PlanError(f"patches: unknown mode {mode!r}; known: {', '.join(MODES)}")
        if self.entry.get("attention", "sdpa") == "gathered" and self.site is None:
            raise PlanError("patches: attention 'gathered' applies to ViTs (tokens dropped after the position "
                            "embedding), not to hierarchical models")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self.before = [spec_of(a) for a in out.all_input_nodes]

    def _locate(self, gm: fx.GraphModule, where: str) -> None:
        if where == "mlp":
            self.regions = find_mlp_regions(gm)
            if not self.regions:
                raise PlanError("no channels-last MLP found: expected Linear -> activation -> Linear on a (B, H, W, C) "
                                "map (a Swin or ConvNeXt block)")
            return
        if where != "auto":
            self.site = find_token_site(gm, where)
            return
        try:
            self.site = find_token_site(gm)
        except PlanError as token_error:
            self.regions = find_mlp_regions(gm)
            if not self.regions:
                raise PlanError(f"patches: the model is neither a ViT nor a hierarchical model fxprune recognises: "
                                f"{token_error}; and no channels-last MLP (Linear -> activation -> Linear on a "
                                f"(B, H, W, C) map, as in Swin / ConvNeXt) was found") from token_error

    # -- call ----------------------------------------------------------------------------------------------------
    def call(self, gm: fx.GraphModule) -> PassResult:
        name = self.entry["proposal"]
        image_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        image = next((x for x in self.example_inputs if isinstance(x, torch.Tensor)), None)
        proposal = build_proposal(name, self.weights)
        like = image if image is not None else next(gm.parameters(), None)
        if like is not None and like.is_floating_point():  # the model's device and precision (a GPU / fp16 model)
            proposal = proposal.to(device=like.device, dtype=like.dtype)
        if image is not None:
            proposal_feature_shape(proposal, name, image)
        gm.add_submodule(SUBMODULE, PatchSignificance(proposal, name))
        keep = float(self.entry["keep"])
        if self.site is not None:
            self._gather_tokens(gm, image_node, keep)
        else:
            self._gather_mlps(gm, image_node, keep)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _gather_tokens(self, gm: fx.GraphModule, image: fx.Node, keep: float) -> None:
        site = self.site
        n, k = site.n_tokens, keep_count(site.n_tokens, keep, site.prefix)
        add = _anchor_inserter(gm.graph, site.node)
        sig = add("call_module", SUBMODULE, (image,))
        idx = add("call_function", select_tokens, (sig, site.grid[0], site.grid[1], k, site.prefix))
        kept = add("call_function", gather_tokens, (site.node, idx))
        site.node.replace_all_uses_with(kept, delete_user_cb=lambda user: user is not kept)
        self.kept = kept
        if k != n:
            carried = _carried(kept)
            # tokens concatenated after the gather (register or class tokens added later) lengthen the sequence
            lengths = {n: k} | {m: k + m - n for m in _longer_sequences(carried, n)}
            for node in _in_order(kept):
                if node.target in _RESHAPES and node not in carried:
                    continue  # reshapes a tensor without tokens (an attention-pool query); only its batch size is read
                if (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
                        node.op == "call_function" and node.target in _SHAPE_FUNCTIONS):
                    for old in sorted(lengths):
                        rewrite_sequence_length(node, old, lengths[old])
        self.entry.update(mode="tokens", node=site.node.name, grid=list(site.grid), prefix=site.prefix, tokens=k)
        if self.entry.get("attention", "sdpa") == "gathered":
            fused, self.kept = fuse_first_attention(gm, site.node, kept, idx)
            self.entry.update(fused)
        self.entry.pop("where", None)
        log.info("patches: %d of %d tokens kept after %s", k, n, site.node.format_node())

    def _gather_mlps(self, gm: fx.GraphModule, image: fx.Node, keep: float) -> None:
        last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        add = _anchor_inserter(gm.graph, last_input)
        sig = add("call_module", SUBMODULE, (image,))
        indices: dict[tuple[int, int], fx.Node] = {}
        for region in self.regions:
            h, w = region.grid
            if region.grid not in indices:
                indices[region.grid] = add("call_function", select_tokens, (sig, h, w, keep_count(h * w, keep, 0), 0))
            idx = indices[region.grid]
            with gm.graph.inserting_before(region.first):
                rows = gm.graph.call_function(gather_positions, (region.source, idx, region.flat))
            region.first.replace_input_with(region.source, rows)
            with gm.graph.inserting_after(region.last):
                back = gm.graph.call_function(scatter_positions, (region.last, idx, h, w, region.flat))
            region.last.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        self.entry.update(mode="mlp", regions=[[r.first.name, r.last.name] for r in self.regions])
        self.entry.pop("where", None)
        log.info("patches: %d MLPs run on kept positions (grids %s)", len(self.regions), sorted(indices))

    def _hint(self, gm: fx.GraphModule) -> str:
        """Why the shortened sequence may not run: a per-position table (rotary embeddings) read after the gather."""
        if self.site is not None and self.kept is not None:
            site, later = self.site, downstream(self.kept)
            sizes = {site.n_tokens, site.grid[0] * site.grid[1]}
            tables = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(spec_of(n), TensorSpec)
                      and len(spec_of(n).shape) >= 2 and sizes & set(spec_of(n).shape[:-1])
                      and any(u in later for u in n.users)]
            if tables:
                t = tables[0]
                return (f"A per-position tensor %{t.name} of shape {tuple(spec_of(t).shape)} (e.g. rotary position "
                        "embeddings) is applied after the gather, which only shortens the token sequence: models "
                        "that use position tables inside their blocks (EVA, RoPE ViTs) are not supported")
        return "If a node hard-codes the sequence length, pass an earlier node as recipe 'where' or report the model"

    # -- ensures -------------------------------------------------------------------------------------------------
    def ensures(self, gm: fx.GraphModule) -> None:
        try:
            record_shapes(gm, self.example_inputs)
        except ExampleInputsError as exc:
            raise RewriteError(f"after gathering patches the graph no longer runs: {exc}. {self._hint(gm)}") from exc
        out = next(n for n in gm.graph.nodes if n.op == "output")
        after = [spec_of(a) for a in out.all_input_nodes]
        if after != self.before:
            raise RewriteError(f"gathering patches changed the model's outputs from {self.before} to {after}")
        if self.kept is not None:
            kept = self.kept
            shape = spec_of(kept)
            if not isinstance(shape, TensorSpec) or shape.shape[1] != self.entry["tokens"]:
                raise RewriteError(f"{kept.format_node()} should hold {self.entry['tokens']} tokens, has {shape}")


@register_rewrite("patches")
def gather_patches(gm: fx.GraphModule, entry: dict, example_inputs: tuple, weights: str | None = None) -> dict:
    """Apply (or replay) a ``patches`` plan entry to ``gm`` in place; returns the resolved entry. ``weights`` (the
    stage's ``proposal_weights``) is loaded into the new proposal; a replay leaves it out, as the saved state dict
    holds the proposal's weights."""
    p = GatherPatches(entry, example_inputs, weights)
    p(gm)
    return p.entry


__all__ = ["GatherPatches", "gather_patches", "SUBMODULE"]
