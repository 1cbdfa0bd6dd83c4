"""Shared fixtures: deterministic seeds for every test, memory hygiene after big tests, and fail-fast workers.

``TRITON_INTERPRET=1`` is set here, before anything imports torch (which imports triton), so the Triton kernels
run under the interpreter on CPU-only machines. Set ``TRITON_INTERPRET=0`` to test the compiled GPU kernels.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ctypes
import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

# The repository's top-level ``kernels/`` (installed as ``fxprune.kernels``) would shadow Hugging Face's ``kernels``
# package, which transformers imports, whenever the repository root is on ``sys.path`` (``python -m pytest`` puts the
# working directory there). Nothing here imports from the root itself: drop it before anything imports transformers.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]
if getattr(sys.modules.get("kernels"), "__file__", "") == str(_ROOT / "kernels" / "__init__.py"):
    del sys.modules["kernels"]

# One intra-op thread per test process: with pytest-xdist workers on 2 cores, more threads oversubscribe the
# cores and small convolutions slow down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


# After a test leaves the process above these resident sizes, hand freed heap pages back to the OS (glibc keeps them
# otherwise; malloc_trim takes well under a millisecond), and above the second also collect garbage first (a full
# gc.collect() takes about 0.3 s once transformers is imported, too slow to run after every test): one big model
# then never inflates a worker for the rest of the run.
TRIM_ABOVE_BYTES = 2_000_000_000
COLLECT_ABOVE_BYTES = 3_000_000_000
_PROCESS = psutil.Process()
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None


def release_memory(collect: bool = True) -> None:
    """``gc.collect()`` (if ``collect``) and ``malloc_trim(0)``: return the memory of dead objects to the OS."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture(autouse=True)
def _memory_hygiene() -> Iterator[None]:
    yield
    rss = _PROCESS.memory_info().rss
    if rss > TRIM_ABOVE_BYTES:
        release_memory(collect=rss > COLLECT_ABOVE_BYTES)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # A worker that dies (OOM killer, segfault, the pytest-timeout backstop) fails the whole run at once instead
    # of being replaced: a replaced worker can leave xdist waiting forever on an empty queue.
    if getattr(config.option, "maxworkerrestart", None) is None and hasattr(config.option, "maxworkerrestart"):
        config.option.maxworkerrestart = "0"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Counts that tests record with record_property("fxprune_count", text) (the fuzz test's oracle count), also
    # from xdist workers, whose reports carry their user properties.
    lines = [value for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
             for key, value in getattr(report, "user_properties", ()) if key == "fxprune_count"]
    for line in lines:
        terminalreporter.write_line(line)
