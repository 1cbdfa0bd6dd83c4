"""Regenerate README's timm coverage table: every model family named in issue #3 at ``flops: 0.3``.

Run: ``python bench/timm_coverage.py [name ...] > timm.md``. Each row is checked with the masked == shrunk oracle
before it is written; a failure is written as a FAIL row with the error's first line (never a silent gap).
Random weights (no downloads); CNNs at 64×64, fixed-size token models at their native 224×224.
"""
from __future__ import annotations

import sys
import time

import timm
import torch

from fxprune.testing import channel_recipe, prune_and_check
from fxprune.work import count_model, count_work

MODELS = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "convnext_tiny", "efficientnet_b0",
    "mobilenetv3_large_100", "regnety_016", "levit_128", "pvt_v2_b0", "mixer_b16_224", "resmlp_12_224",
    "poolformer_s12", "efficientformer_l1", "cspdarknet53", "dla34", "ghostnet_100", "repvgg_a2", "hrnet_w18_small",
    "res2net50_26w_4s", "rexnet_100", "vovnet39a", "darknet53", "focalnet_tiny_srf", "coat_lite_tiny",
    "edgenext_x_small", "fastvit_t8", "beit_base_patch16_224", "eva02_tiny_patch14_224", "maxvit_tiny_tf_224",
    "mobilevit_xs", "twins_svt_small",
]


def input_size(model: torch.nn.Module, name: str) -> int:
    """64 where the model accepts any size; the configured size for fixed-grid token models."""
    fixed = ("deit", "vit_", "swin", "levit", "mixer", "resmlp", "efficientformer", "coat", "beit", "eva02", "maxvit",
             "twins", "pvt")
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]) if name.startswith(fixed) else 64


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    out = sys.stdout
    out.write("| model | input | MACs ratio | params ratio | compile + check s |\n|---|---|---|---|---|\n")
    for name in names or MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = input_size(model, name)
        x = torch.randn(1, 3, size, size)
        t0 = time.perf_counter()
        try:
            base = count_work(model, x)
            pruned = prune_and_check(model, channel_recipe(0.3, "flops"), x, atol=1e-3, rtol=1e-3)
            c = count_model(pruned)
            row = [f"{c['macs'] / base['macs']:.3f}", f"{c['params'] / base['params']:.3f}"]
        except Exception as exc:  # a row per failure
            row = [f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", ""]
        out.write(f"| {name} | {size} | {row[0]} | {row[1]} | {time.perf_counter() - t0:.1f} |\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
