"""Progress bars and timing logs for calibration passes (the loops over ``data`` of criteria and recovery).

A ``tqdm`` bar is shown on rank 0 only, and only when stderr is a terminal; every pass logs its batch count and
wall time at INFO level (``logging.getLogger("fxprune")``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from . import distributed

log = logging.getLogger(__name__)
T = TypeVar("T")


def calibration_pass(items: Iterable[T], desc: str, unit: str = "batches") -> Iterator[T]:
    """Yield ``items`` under a progress bar named ``desc`` (rank 0, terminals only) and log the pass' timing
    (``unit``: what the items are, for the log)."""
    try:
        total: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an IterableDataset
        total = None
    start = time.perf_counter()
    n = 0
    bar = tqdm(items, desc=f"fxprune {desc}", total=total, leave=False,
               disable=True if not distributed.is_main() else None)
    try:
        for item in bar:
            n += 1
            yield item
    finally:
        bar.close()
        log.info("calibration pass '%s': %d %s in %.2f s (rank %d of %d)", desc, n, unit, time.perf_counter() - start,
                 distributed.rank(), distributed.world_size())


__all__ = ["calibration_pass"]
