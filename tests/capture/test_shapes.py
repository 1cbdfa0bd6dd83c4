"""Shape arithmetic spelled out element by element (``fxprune.capture.shapes``) on graphs that plain torch.fx
cannot trace: the traced graph computes what the model computes, and a 0-d shape ``()`` survives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune.trace import trace


class ShapeArithmetic(nn.Module):
    """A branch on a size (plain torch.fx cannot decide it), a Hugging Face-style ``view`` of a size slice plus a
    tuple, and a 0-d ``new_ones(())`` (as ``transformers.masking_utils.and_masks`` writes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = x * 2
        heads = x.view(x.size()[:-1] + (2, x.shape[-1] // 2))
        return heads.sum(-1) + x.new_ones((), dtype=x.dtype)


def test_shapes_are_spelled_out_and_a_0d_shape_is_kept() -> None:
    x = torch.randn(3, 5, 8)
    gm = trace(ShapeArithmetic(), example_inputs=(x,))
    torch.testing.assert_close(gm(x), ShapeArithmetic()(x))
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert len(views) == 1 and len(views[0].args) == 5, views[0].format_node()  # x, size[0], size[1], 2, 4
    ones = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "new_ones")
    assert ones.args[1:] == ((),), ones.format_node()


class MaskedByDtype(nn.Module):
    """Hugging Face mask code: ``torch.finfo(x.dtype).min`` of a traced dtype, and a module built inside forward."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:  # plain torch.fx cannot decide it: the capture traces
            x = x * 2
        x = x.masked_fill(mask == 0, torch.finfo(x.dtype).min)
        return nn.Softmax(dim=-1)(x)


def test_finfo_of_a_traced_dtype_is_answered_and_guarded() -> None:
    from fxprune.capture import GuardError

    x, mask = torch.randn(2, 8), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    gm = trace(MaskedByDtype(), example_inputs=(x, mask))
    torch.testing.assert_close(gm(x, mask), MaskedByDtype()(x, mask))
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # the Softmax built in forward is traced through
    with pytest.raises(GuardError, match="dtype"):  # the mask's fill value is float32's
        gm(x.double(), mask)
