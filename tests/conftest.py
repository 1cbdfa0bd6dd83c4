"""Shared fixtures: deterministic seeds for every test.

``TRITON_INTERPRET=1`` is set here, before anything imports torch (which imports triton), so the Triton kernels
run under the interpreter on CPU-only machines. Set ``TRITON_INTERPRET=0`` to test the compiled GPU kernels.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

# One intra-op thread per test process: with pytest-xdist workers on 2 cores, more threads oversubscribe the
# cores and small convolutions slow down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
