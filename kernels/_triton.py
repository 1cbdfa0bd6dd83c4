"""What every kernel file shares about Triton: one guarded import and one interpreter check.

Triton is a Linux-only dependency, so a kernel module imports ``triton`` / ``tl`` from here and defines its
``@triton.jit`` kernel under ``if HAS_TRITON:``; its PyTorch reference and custom op work without Triton.
Whether a kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) is decided once, when
``@triton.jit`` builds it, so ``interpreted(kernel)`` asks the kernel itself rather than the environment.
"""
from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None
    tl = None
    HAS_TRITON = False


def interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function, or an autotuner wrapping one) was built for the Triton
    interpreter, i.e. ``TRITON_INTERPRET=1`` was set before triton was first imported."""
    candidates = (kernel, getattr(kernel, "fn", None))  # triton.autotune keeps the jitted function as ``fn``
    return HAS_TRITON and any(type(f).__name__ == "InterpretedFunction" for f in candidates)


__all__ = ["HAS_TRITON", "interpreted", "tl", "triton"]
