"""Channel spaces: one dimension of one tensor (or of one parameter axis), the unit the coupling graph links."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Space(NamedTuple):
    """One dimension of a tensor in the graph.

    ``owner`` is an fx node name, or ``"@" + module/attribute path`` for a parameter axis shared by every call of
    that module. ``item`` indexes a tuple result (0 for a single tensor). ``dim`` is a non-negative dimension.
    """

    owner: str
    item: int
    dim: int

    def key(self) -> str:
        """A stable string form, used in plans and reports."""
        return f"{self.owner}:{self.item}:{self.dim}"

    @staticmethod
    def parse(key: str) -> Space:
        owner, item, dim = key.rsplit(":", 2)
        return Space(owner, int(item), int(dim))

    @property
    def is_param(self) -> bool:
        return self.owner.startswith("@")


class Port(NamedTuple):
    """A tensor in the graph: ``(owner, item)`` plus its recorded shape."""

    owner: str
    item: int
    shape: tuple[int, ...]

    def space(self, dim: int) -> Space:
        return Space(self.owner, self.item, dim % len(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)


Index = "np.ndarray | None"  # None means every slot of the space


def arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)
