"""PaPr (``patches``) over every timm ``vit_*`` and ``deit*`` model: which ones fxprune can drop tokens from.

Run: ``python bench/papr_timm_coverage.py [regex] > papr_timm.md`` (about 10 minutes on one core). Each model is
built with random weights and ``depth=2`` where its constructor takes it (the token path is the same at any depth;
the MACs ratios then overstate the proposal's share). A row passes when ``keep = 1`` reproduces the model (max
error at most 1e-5 of its output scale; a gather of every token may change float rounding) and ``keep = 0.5`` runs
without error (its MACs ratio, the proposal included, is reported: at depth 2 a small model can cost more than
it saves). Failures are written with the error's first line, never left out; a summary line follows.
"""
from __future__ import annotations

import collections
import re
import sys
import time

import timm
import torch

import fxprune
from fxprune.work import count_work


def check(name: str) -> tuple[str, str]:
    """(``pass`` or the failure's kind, the row's detail)."""
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, depth=2)
    except TypeError:  # a constructor without ``depth``
        model = timm.create_model(name, pretrained=False)
    except AssertionError as exc:  # per-block settings (sapiens2): too large to build at full depth here
        return "not built", f"not built at depth 2 ({exc}) | | | "
    model = model.eval()
    size = tuple(getattr(model.patch_embed, "img_size", (224, 224))) if hasattr(model, "patch_embed") else (224, 224)
    x = torch.randn(2, 3, *size)
    whole = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 1.0}]}, example_inputs=x[:1])
    half = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5}]}, example_inputs=x[:1])
    with torch.no_grad():
        want = model(x)
        error = float((whole(x) - want).abs().max()) / max(1.0, float(want.abs().max()))
        half(x)
    ratio = count_work(half, x[:1])["macs"] / count_work(model, x[:1])["macs"]
    e = half.fxprune_plan.rewrites[0]
    detail = (f"{size[0]}x{size[1]} | {e['mode']} at %{e.get('node')}, prefix {e.get('prefix')} | {error:.1e} | "
              f"{ratio:.3f}")
    return ("pass" if error <= 1e-5 else "keep=1 differs"), detail


def main(pattern: str = "") -> None:
    torch.set_num_threads(1)
    names = sorted({*timm.list_models("vit_*"), *timm.list_models("deit*")})
    names = [n for n in names if re.search(pattern, n)]
    out, kinds = sys.stdout, collections.Counter()
    out.write("| model | input | token site | keep=1 error | MACs ratio at keep=0.5 | s |\n|---|---|---|---|---|---|\n")
    for name in names:
        t0 = time.perf_counter()
        try:
            kind, detail = check(name)
        except Exception as exc:  # a row per failure
            kind, detail = type(exc).__name__, f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | | "
        kinds[kind] += 1
        out.write(f"| {name} | {detail} | {time.perf_counter() - t0:.1f} |\n")
        out.flush()
    out.write(f"\n{kinds['pass']} of {len(names)} pass; " + ", ".join(f"{k}: {v}" for k, v in kinds.items()
                                                                   if k != "pass") + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
