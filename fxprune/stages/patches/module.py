"""The ``patches`` rewrite in module mode (``fxprune.compile(..., output="module")``).

The model's own forward keeps running, so the token gather needs a module of the model to sit in: the module right
after the token site (timm's ``pos_drop``) or the module that produced it. That module is replaced by
``TokenGather``, which runs it and the proposal + top-k + gather of ``select`` (before or after it, as in the
rewritten graph). The proposal reads the model's input image, which a forward pre-hook on the model hands over.
Other layouts (no such module, ``mode: "mlp"``, ``attention: "gathered"``) are refused.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ...passes.graph_diff import refusal
from ...passes.write_back import Claim, register_module_rewrite
from .gather import SUBMODULE
from .select import PatchSignificance, gather_tokens, select_tokens


class TokenGather(nn.Module):
    """``inner`` (the model's module at the token site) with PaPr token selection before or after it.

    Args:
        inner: the module that was there.
        significance: the proposal (``PatchSignificance``).
        grid, count, prefix: the patch grid, the tokens kept (counting the prefix tokens), the prefix tokens.
        before: gather the tokens before ``inner`` runs (else after).
        image_at: where the model's forward receives the image: its position, and its name (if passed by keyword).
    """

    def __init__(self, inner: nn.Module, significance: PatchSignificance, grid: tuple[int, int], count: int,
                 prefix: int, before: bool, image_at: tuple[int, str]) -> None:
        super().__init__()
        self.inner, self.significance = inner, significance
        self.grid, self.count, self.prefix, self.before = tuple(grid), count, prefix, before
        self.image_at = image_at
        self._image: torch.Tensor | None = None

    def capture_image(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: remember the image its forward receives."""
        position, name = self.image_at
        self._image = args[position] if position < len(args) else kwargs.get(name)

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("TokenGather runs inside the pruned model's forward: it reads the image the model was "
                               "called with (call the whole model, not this submodule)")
        idx = select_tokens(self.significance(image), self.grid[0], self.grid[1], self.count, self.prefix)
        return gather_tokens(tokens, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before:
            return self.inner(self._gather(x))
        return self._gather(self.inner(x))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, count={self.count}, prefix={self.prefix}, before={self.before}"


def _parts(gm: fx.GraphModule, entry: dict) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """The token site and the inserted significance, selection and gather nodes."""
    site = next(n for n in gm.graph.nodes if n.name == entry["node"])
    kept = next(u for u in site.users if u.target is gather_tokens)
    idx = kept.args[1]
    return site, idx.args[0], idx, kept


@register_module_rewrite("patches")
def patches_in_module(gm: fx.GraphModule, entry: dict, model: nn.Module) -> Claim:
    """The ``Claim`` of one ``patches`` entry: its nodes, and ``apply`` putting a ``TokenGather`` in the tree."""
    if entry.get("mode") != "tokens":
        raise refusal(None, "patches: module mode gathers the tokens of ViTs; the 'mlp' mode of hierarchical models "
                            "rewrites every MLP inside the graph, which the model's forward cannot pick up")
    if entry.get("attention", "sdpa") != "sdpa":
        raise refusal(None, "patches: attention 'gathered' fuses the gather into the first attention of the graph; "
                            "module mode supports attention 'sdpa'")
    site, sig, idx, kept = _parts(gm, entry)
    users = list(kept.users)
    if site.op == "call_module" and site.target:
        path, before = str(site.target), False
    elif len(users) == 1 and users[0].op == "call_module" and users[0].args == (kept,) and not users[0].kwargs:
        path, before = str(users[0].target), True
    else:
        raise refusal(site, "patches: module mode needs a module of the model right after the token site (timm's "
                            "pos_drop / patch_drop) or producing it, to hold the gather; there is none")
    image = sig.args[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(image, fx.Node) or image not in placeholders:
        raise refusal(sig, "patches: the proposal does not read a model input")
    image_at = (placeholders.index(image), str(image.target))
    significance = gm.get_submodule(SUBMODULE)

    def apply(target: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = target.get_submodule(parent_path)
        gather = TokenGather(parent.get_submodule(name), significance, tuple(entry["grid"]), int(entry["tokens"]),
                             int(entry["prefix"]), before, image_at)
        setattr(parent, name, gather)
        target.register_forward_pre_hook(gather.capture_image, with_kwargs=True)

    return Claim(nodes={sig.name, idx.name, kept.name}, alias={kept.name: site.name}, paths={SUBMODULE},
                 apply=apply)


__all__ = ["TokenGather", "patches_in_module"]
