"""Data-parallel calibration: sums of statistics across ``torch.distributed`` ranks.

Under ``torchrun`` each rank passes its own shard of the calibration batches as ``data``. Every data-driven
statistic (``taylor`` / ``hessian`` gradients, ``catro`` class scatters, ``lpvit`` block gradients, BatchNorm
statistics, the Gram matrices of ``recover: [lstsq]``) is a sum over batches, so summing each rank's partial sum
gives the statistic of the union of the shards; every rank then makes the same plan and the same weights.

Every helper is a no-op when ``torch.distributed`` is not initialized, so single-process code pays nothing.
With the NCCL backend, CPU tensors are reduced through the current CUDA device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process' rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that shows progress bars."""
    return rank() == 0


def _comm_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (in place when possible; returns the reduced tensor). No-op in one process."""
    if not is_initialized() or world_size() == 1:
        return t
    device = _comm_device(t)
    buf = t if device == t.device and t.is_contiguous() else t.to(device).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_reduce_sum_many(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor of ``tensors`` over the ranks, in place, with one collective per dtype and device."""
    if not is_initialized() or world_size() == 1 or not tensors:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group]) if len(group) > 1 else group[0].reshape(-1).clone()
        all_reduce_sum(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_reduce_count(n: float) -> float:
    """A count (batches, samples) summed over the ranks, as a float."""
    if not is_initialized() or world_size() == 1:
        return float(n)
    t = torch.tensor([float(n)], dtype=torch.float64)
    return all_reduce_sum(t).item()


def all_reduce_max(n: int) -> int:
    """The largest ``n`` over the ranks."""
    if not is_initialized() or world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    device = _comm_device(t)
    buf = t.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (no-op in one process)."""
    if not is_initialized() or world_size() == 1:
        return
    for t in tensors:
        device = _comm_device(t)
        buf = t if device == t.device and t.is_contiguous() else t.to(device).contiguous()
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf.to(t.device))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size()``-th item starting at ``rank()`` (all in one process).

    A convenience for calibration lists; a ``DataLoader`` with a ``DistributedSampler`` shards the same way.
    """
    return list(items[rank()::world_size()])


__all__ = [
    "all_gather_objects",
    "all_reduce_count",
    "all_reduce_max",
    "all_reduce_sum",
    "all_reduce_sum_many",
    "broadcast_",
    "is_initialized",
    "is_main",
    "rank",
    "shard",
    "world_size",
]
