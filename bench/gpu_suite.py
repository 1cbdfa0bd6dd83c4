"""The one-shot GPU suite behind ``bench/gpu_suite.sh``: every GPU figure of fxprune in one markdown report.

Sections (each a "provider" table; a section that fails records its error and the suite goes on):

1. kernel tests (``tests/kernels``; ``TRITON_INTERPRET=0`` on CUDA);
2. block-sparse linear: ours vs dense ``F.linear`` vs torch BSR, bf16 and fp16, ViT-B fc1/fc2/qkv/proj, batch
   1/8/64/256 x 197 tokens, sparsity 0.5/0.75/0.9 (helpers of ``bench_blocksparse.py``);
3. gathered attention: ours vs gather + SDPA (``reference``) vs full SDPA, keep 1.0/0.7/0.5/0.3, batch 1/8/64;
4. end to end ViT-B/16: block-sparse (``lpvit``, 50%) and PaPr (z = 0.5) vs dense, eager and ``torch.compile``;
5. the latency-target plan (``channels``, ``latency: 0.5``, ``round_to: auto``) for resnet50 at batch 1 and 64.

``--dry-run`` runs on CPU with interpreter-sized problems (tiny shapes, one batch, two-block ViTs at 32 px,
resnet18 at 64 px with ``latency: 0.1``, ``torch.compile`` with the ``eager`` backend, kernel tests collected
only): every provider resolves and the report is written, in under a minute.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_ms

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_suite")


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def kernel_tests(dry: bool, device: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/kernels"]
    if dry:  # collected in this process (its imports are warm): every kernel test resolves
        import pytest

        code = pytest.main(["-p", "no:cacheprovider", "-q", "--collect-only", str(ROOT / "tests/kernels")])
        return f"`pytest -q --collect-only tests/kernels` (dry run) -> exit {int(code)}\n"
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = [line for line in out.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return f"`{' '.join(cmd[2:])}` -> exit {out.returncode}: {tail[0]}\n"


def blocksparse(dry: bool, device: str) -> str:
    from bench_blocksparse import BLOCK, _make_fn

    shapes = {"fc1": (3072, 768), "fc2": (768, 3072), "qkv": (2304, 768), "proj": (768, 768)}
    if dry:
        shapes = {k: (n // 24 // 32 * 32 or 32, k_ // 24 // 32 * 32 or 32) for k, (n, k_) in shapes.items()}
    dtypes = (torch.float32,) if device == "cpu" else (torch.bfloat16, torch.float16)
    batches, sparsities = ((1,), (0.5,)) if dry else ((1, 8, 64, 256), (0.5, 0.75, 0.9))
    tokens = 5 if dry else 197
    rows = []
    for dtype in dtypes:
        for layer, (n, k) in shapes.items():
            for batch in batches:
                for sparsity in sparsities:
                    gen = torch.Generator().manual_seed(0)
                    grid = (n // BLOCK[0], k // BLOCK[1])
                    mask = torch.rand(grid, generator=gen) >= sparsity
                    w = torch.randn(n, k, generator=gen) * mask.repeat_interleave(BLOCK[0], 0).repeat_interleave(
                        BLOCK[1], 1)
                    to = dict(device=device, dtype=dtype)
                    x, b = torch.randn(batch * tokens, k).to(**to), torch.randn(n).to(**to)
                    row: dict = {"dtype": str(dtype).split(".")[-1], "layer": layer, "batch": batch,
                                 "sparsity": sparsity}
                    for provider in ("dense", "ours", "torch_bsr"):
                        try:
                            fn = _make_fn(provider, x, w.to(**to), b, mask.to(device))
                            row[f"{provider}_ms"] = device_ms(fn, device, 3)
                        except (RuntimeError, NotImplementedError) as exc:  # BSR has no kernel for some dtypes
                            row[f"{provider}_ms"] = f"n/a ({type(exc).__name__})"
                    if isinstance(row["ours_ms"], float):
                        row["ours_vs_dense"] = row["dense_ms"] / row["ours_ms"]
                    rows.append(row)
    return md_table(rows)


def gathered(dry: bool, device: str) -> str:
    from fxprune.kernels.gathered_attention import gathered_attention, gathered_attention_reference

    tokens, heads, dim = (17, 2, 16) if dry else (197, 12, 64)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    for z in ((0.5,) if dry else (1.0, 0.7, 0.5, 0.3)):
        for batch in ((1,) if dry else (1, 8, 64)):
            gen = torch.Generator().manual_seed(0)
            qkv = torch.randn(batch, tokens, 3, heads, dim, generator=gen).to(device=device, dtype=dtype)
            kept = max(2, int(tokens * z))
            idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                          torch.randperm(tokens - 1, generator=gen)[:kept - 1] + 1])
                               for _ in range(batch)]).to(device)

            def full() -> torch.Tensor:
                q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
                return F.scaled_dot_product_attention(q, k, v)

            calls = {"gather+sdpa": lambda: gathered_attention_reference(qkv, idx), "full_sdpa": full,
                     "ours": lambda: gathered_attention(qkv, idx, backend="triton", check_indices=False)}
            row: dict = {"z": z, "batch": batch}
            for name, fn in calls.items():
                try:
                    row[f"{name}_ms"] = device_ms(fn, device, 3)
                except Exception as exc:  # a provider that cannot run here is reported
                    row[f"{name}_ms"] = f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
            rows.append(row)
    return md_table(rows)


def end_to_end(dry: bool, device: str) -> str:
    import fxprune

    size, batch = (32, 1) if dry else (224, 64)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    import timm
    import torchvision

    torch.manual_seed(0)
    x1 = torch.randn(1, 3, size, size)
    if dry:  # ViT-B/16's structure at interpreter size
        vit_timm = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, depth=2, embed_dim=64,
                                     num_heads=2).eval()
        vit_tv = torchvision.models.VisionTransformer(image_size=size, patch_size=16, num_layers=2, num_heads=2,
                                                      hidden_dim=64, mlp_dim=128).eval()
    else:
        vit_timm = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        vit_tv = torchvision.models.vit_b_16(weights=None).eval()
    bs = {"stages": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [32, 32], "criterion": "lpvit"}]}
    papr = {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "torchvision:mobilenet_v3_small"}]}
    cases = [("blocksparse 0.5", vit_timm, fxprune.compile(vit_timm, bs, example_inputs=x1)),
             ("PaPr z=0.5", vit_tv, fxprune.compile(vit_tv, papr, example_inputs=x1))]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    for name, dense, pruned in cases:
        dense, pruned = dense.to(device, dtype), pruned.to(device, dtype)
        for mode in ("eager", "compile"):
            if mode == "compile":
                backend = "eager" if dry else "inductor"
                dense, pruned = torch.compile(dense, backend=backend), torch.compile(pruned, backend=backend)
            with torch.inference_mode():
                d = device_ms(lambda: dense(x), device, 3)
                p = device_ms(lambda: pruned(x), device, 3)
            rows.append({"model": name, "mode": mode, "batch": batch, "dense_ms": d, "pruned_ms": p,
                         "speedup": d / p})
    return md_table(rows)


def latency_plan(dry: bool, device: str) -> str:
    import torchvision

    import fxprune
    from fxprune.work import count_work

    name, size, batches, target = ("resnet18", 64, (1,), 0.1) if dry else ("resnet50", 224, (1, 64), 0.5)
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        recipe = {"stages": [{"kind": "channels", "target": {"latency": target}, "round_to": "auto"}]}
        pruned = fxprune.compile(model, recipe, example_inputs=x)
        s = pruned.fxprune_plan.stats
        macs = count_work(model, x[:1])["macs"] / count_work(pruned, x[:1])["macs"]
        speed = s["latency_base_ms"] / s["latency_measured_ms"]
        rows.append({"model": name, "batch": batch, "requested": s["latency_requested_ratio"],
                     "predicted": s["latency_predicted_ratio"], "measured": s["latency_measured_ratio"],
                     "corrections": int(s["latency_corrections"]), "table_s": s["latency_table_s"],
                     "macs_ratio": macs, "efficiency": speed / macs})
    return md_table(rows)


SECTIONS = [("Kernel tests", kernel_tests), ("Block-sparse linear", blocksparse),
            ("Gathered attention", gathered), ("End to end ViT-B/16", end_to_end),
            ("Latency-target plan", latency_plan)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter-sized problems")
    parser.add_argument("--out", default="gpu_suite_report.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    parts = [f"# fxprune GPU suite{' (dry run)' if args.dry_run else ''}\n",
             f"device: {name}; torch {torch.__version__}\n"]
    failed = 0
    for title, fn in SECTIONS:
        start = time.perf_counter()
        try:
            body = fn(args.dry_run, device)
        except Exception:  # reported; the other sections still run
            failed += 1
            body = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```\n"
        parts.append(f"## {title}\n\n{body}\n({time.perf_counter() - start:.1f} s)\n")
        Path(args.out).write_text("\n".join(parts))
    print(f"report written to {args.out} ({failed} section(s) failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
