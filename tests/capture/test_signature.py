"""Signature binding: keyword (dict) inputs, ``*args``/``**kwargs`` forwards, kwargs-rebuilding decorators and
``return_dict`` flags trace, prune and round-trip through save/load and report."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ExampleInputsError
from fxprune.testing import channel_recipe, prune_and_check


def rebuild_kwargs(fn):
    """A decorator in the style of transformers': it rebuilds the keyword arguments as a dict and calls on."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        names = list(fn.__code__.co_varnames[1:fn.__code__.co_argcount])
        for name, value in zip(names, args):
            kwargs[name] = value
        kwargs.setdefault("return_dict", True)
        return fn(self, **kwargs)

    return wrapper


class KwargsNet(nn.Module):
    """``forward(pixel_values, mask=None, return_dict=...)`` behind a kwargs-rebuilding decorator."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    @rebuild_kwargs
    def forward(self, pixel_values, mask=None, scale=2.0, return_dict=None):
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values)))) * scale
        if mask is not None:
            h = h * mask
        logits = self.fc(h.mean((2, 3)))
        return {"logits": logits, "features": h} if return_dict else (logits,)


class VarArgsNet(nn.Module):
    """``forward(x, *args, **kwargs)``, as Ultralytics' ``DetectionModel``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))

    def forward(self, x, *args, **kwargs):
        if kwargs.get("augment"):
            x = torch.flip(x, (-1,))
        return self.body(x)


def test_dict_inputs_compile_check_save_load_report(tmp_path):
    model = KwargsNet().eval()
    inputs = {"pixel_values": torch.randn(1, 3, 16, 16)}
    pruned = prune_and_check(model, channel_recipe(0.5), inputs)
    out = pruned(inputs["pixel_values"])
    assert set(out) == {"logits", "features"} and out["features"].shape == (1, 16, 16, 16)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    path = fxprune.save(pruned, tmp_path / "k.fxp", example_inputs=inputs)
    for given in (inputs, None):  # None: zeros of the stored shapes, bound by the stored names
        again = fxprune.load(path, KwargsNet, given)
        torch.testing.assert_close(again(inputs["pixel_values"])["logits"], out["logits"])
    report = fxprune.report(model, pruned, inputs)
    assert report.params[1] < report.params[0] and report.macs[1] < report.macs[0]


def test_varargs_forward_prunes():
    model = VarArgsNet().eval()
    pruned = prune_and_check(model, channel_recipe(0.5), (torch.randn(1, 3, 16, 16),))
    assert pruned.get_submodule("body.0").out_channels < 16


def test_unknown_keyword_input_is_named():
    with pytest.raises(ExampleInputsError, match="pixels"):
        fxprune.compile(KwargsNet(), channel_recipe(0.5), example_inputs={"pixels": torch.randn(1, 3, 8, 8)})
