"""Shape arithmetic spelled out element by element (``fxprune.capture.shapes``) on graphs that plain torch.fx
cannot trace: the traced graph computes what the model computes, and a 0-d shape ``()`` survives."""
from __future__ import annotations

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
