"""Regenerate README's timm coverage table: every model family named in issue #3 at ``flops: 0.3``, or a random
sample of ``timm.list_models()``.

Run: ``python bench/timm_coverage.py [name ...] > timm.md``, or ``python bench/timm_coverage.py --sample 40 --seed 0``.
Each row is checked with the masked == shrunk oracle before it is written; a failure is written as a FAIL row with
the error's first line (never a silent gap). Random weights (no downloads). Named models: CNNs at 64×64, fixed-size
token models at their native size. Sampled models: 64×64 where the model runs at 64 as built, else built with
``img_size=64`` where it takes that argument and runs, else at its native size; models over ``--max-params`` are
written as SKIP rows (this machine's per-process memory budget), and each model has ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import gc
import random
import signal
import sys
import time
from typing import Any

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
HEADER = "| model | input | MACs ratio | params ratio | compile + check s |\n|---|---|---|---|---|\n"


def input_size(model: torch.nn.Module, name: str) -> int:
    """64 where the model accepts any size; the configured size for fixed-grid token models."""
    fixed = ("deit", "vit_", "swin", "levit", "mixer", "resmlp", "efficientformer", "coat", "beit", "eva02", "maxvit",
             "twins", "pvt")
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]) if name.startswith(fixed) else 64


class ModelTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise ModelTimeout("model took longer than --timeout")


def meta_params(name: str) -> int | None:
    """Parameters of the model built on the meta device (nothing allocated); ``None`` if it cannot be built so."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    except Exception:  # some model inits compute with real values
        return None


def build_sampled(name: str) -> tuple[torch.nn.Module, int, str]:
    """The model, its input size and the create_model arguments used (see the module docstring)."""
    x = torch.randn(1, 3, 64, 64)
    for kwargs in ({}, {"img_size": 64}):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            with torch.no_grad():
                model(x)
            return model, 64, ", ".join(f"{k}={v}" for k, v in kwargs.items())
        except Exception:  # not at 64 (fixed grid, window sizes) or no such argument: try the next way
            continue
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]), ""


def check(model: torch.nn.Module, size: int) -> list[str]:
    x = torch.randn(1, 3, size, size)
    base = count_work(model, x)
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), x, atol=1e-3, rtol=1e-3)
    c = count_model(pruned)
    return [f"{c['macs'] / base['macs']:.3f}", f"{c['params'] / base['params']:.3f}"]


def _fail(exc: BaseException) -> list[str]:
    return [f"FAIL {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}", ""]


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    out = sys.stdout
    out.write(HEADER)
    for name in names or MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = input_size(model, name)
        t0 = time.perf_counter()
        try:
            row = check(model, size)
        except Exception as exc:  # a row per failure
            row = _fail(exc)
        out.write(f"| {name} | {size} | {row[0]} | {row[1]} | {time.perf_counter() - t0:.1f} |\n")
        out.flush()


def sample(n: int, seed: int, max_params: float, timeout: int) -> None:
    """``n`` models drawn from ``timm.list_models()`` with ``random.Random(seed)``; a summary line at the end."""
    torch.set_num_threads(1)
    names = random.Random(seed).sample(timm.list_models(), n)
    out = sys.stdout
    out.write(f"timm {timm.__version__}, --sample {n} --seed {seed}\n\n{HEADER}")
    passed, failed, skipped = [], [], []
    signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        params = meta_params(name)
        if params is not None and params > max_params:
            skipped.append(name)
            out.write(f"| {name} | | SKIP: {params / 1e6:.0f} M params > --max-params | | |\n")
            continue
        t0 = time.perf_counter()
        size, how = 0, ""
        signal.alarm(timeout)
        try:
            model, size, how = build_sampled(name)
            row = check(model, size)
            passed.append(name)
        except Exception as exc:  # a row per failure
            row = _fail(exc)
            failed.append(name)
        finally:
            signal.alarm(0)
            model = None
            gc.collect()
        shown = f"{size} ({how})" if how else str(size or "")
        out.write(f"| {name} | {shown} | {row[0]} | {row[1]} | {time.perf_counter() - t0:.1f} |\n")
        out.flush()
    tested = len(passed) + len(failed)
    out.write(f"\n{len(passed)} of {tested} tested models pass ({100 * len(passed) / max(tested, 1):.0f}%); "
              f"{len(skipped)} skipped as too large; failures: {', '.join(failed) or 'none'}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to check (default: the README list)")
    parser.add_argument("--sample", type=int, default=0, help="check N random models of timm.list_models()")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--max-params", type=float, default=260e6, help="skip sampled models with more parameters")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per sampled model")
    args = parser.parse_args()
    if args.sample:
        sample(args.sample, args.seed, args.max_params, args.timeout)
    else:
        main(args.names)
