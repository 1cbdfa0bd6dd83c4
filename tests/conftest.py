"""Shared fixtures: deterministic seeds for every test, memory hygiene after big tests, and fail-fast workers.

``TRITON_INTERPRET=1`` is set here, before anything imports torch (which imports triton), so the Triton kernels
run under the interpreter on CPU-only machines. Set ``TRITON_INTERPRET=0`` to test the compiled GPU kernels.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ctypes
import gc

import numpy as np
import psutil
import pytest
import torch

# One intra-op thread per test process: with pytest-xdist workers on 2 cores, more threads oversubscribe the
# cores and small convolutions slow down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


# After a test leaves the process above this resident size, collect garbage and hand freed heap pages back to the
# OS (glibc keeps them otherwise): one big model then never inflates the worker for the rest of the run.
TRIM_ABOVE_BYTES = 1_500_000_000
_PROCESS = psutil.Process()
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None


def release_memory() -> None:
    """``gc.collect()`` and ``malloc_trim(0)``: return the memory of dead objects to the OS."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture(autouse=True)
def _memory_hygiene() -> None:
    yield
    if _PROCESS.memory_info().rss > TRIM_ABOVE_BYTES:
        release_memory()


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
