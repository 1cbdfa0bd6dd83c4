"""``ClassMoments`` (streamed per-class sums, what ``catro`` sums over ranks) equals ``class_scatter`` on the
pooled features, whatever the batches and however the classes spread over them."""
from __future__ import annotations

import numpy as np
import torch

from fxprune.criteria.catro import class_scatter
from fxprune.criteria.scatter import ClassMoments


def test_streamed_moments_equal_the_two_pass_scatter() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (60, 5))
    y = rng.integers(0, 4, 60)
    y[:10] = 5  # class 4 never appears; class 5 only in the first batch
    m = ClassMoments(5)
    for lo in range(0, 60, 7):
        m.add(torch.tensor(x[lo:lo + 7]), torch.tensor(y[lo:lo + 7]))
    m.reduce()  # one process: a no-op
    sb, sw = m.scatter()
    want_b, want_w = class_scatter(x, y)
    np.testing.assert_allclose(sb, want_b, rtol=1e-10)
    np.testing.assert_allclose(sw, want_w, rtol=1e-10)
