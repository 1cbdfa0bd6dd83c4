"""Kernel tests run the Triton kernels through the Triton interpreter by default,
so they pass on CPU-only machines.

triton reads TRITON_INTERPRET when ``triton.language`` is imported and when
``@triton.jit`` decorates a kernel, so the variable must be in the environment
before triton is first imported: it is set here, at conftest import time (importing
torch does not import triton; ``torch._dynamo`` does).  To test the compiled
kernels on a GPU, opt out explicitly::

    TRITON_INTERPRET=0 pytest tests/kernels -m gpu
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
