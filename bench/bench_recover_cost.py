"""Cost of training-free recovery (``recover``) on torchvision resnet50 at 224x224 with 64 calibration images.

Run: ``python bench/bench_recover_cost.py [--only SUBSTRING] [--repeat N]`` (2 threads, about 3 minutes per
repeat). Prints a markdown table to stdout.

resnet50 (random weights) is pruned at ``flops: 0.5`` with ``l2`` (no data needed to plan), then each recovery
setting is applied to a fresh copy of the pruned model with ``fxprune.recover.recover`` on 4 batches of 16 images.
Reported per setting: wall seconds, the multiple of one plain calibration pass (the dense model's forward over the
same 64 images, no grad; the mean of one pass right before and one right after the setting, so that a shared
machine's changing load affects both alike), the seconds of each pass over the data (from the ``fxprune.progress``
timing logs), and the peak resident memory above the level before recovery (sampled every 5 ms with psutil).
With ``--repeat N`` the settings run N times, round-robin (interleaved, so that a load change hits every setting):
the table gives the median run's figures and the range of the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import torch
import torchvision

import fxprune
from fxprune.recover import LstsqOptions, recover

SETTINGS = [
    ("bn", ["bn"], None),
    ("bias", ["bias"], None),
    ("lstsq (default: cached)", ["lstsq"], None),
    ("bn+bias+lstsq (default: cached)", ["bn", "bias", "lstsq"], None),
    ("bn+bias+lstsq, cached, float64 products", ["bn", "bias", "lstsq"], LstsqOptions(products="float64")),
    ("bn+bias+lstsq, streamed (cache_mb 0), passes 4", ["bn", "bias", "lstsq"], LstsqOptions(cache_mb=0)),
    ("bn+bias+lstsq, streamed (cache_mb 0), passes 1", ["bn", "bias", "lstsq"], LstsqOptions(cache_mb=0, passes=1)),
]


@contextlib.contextmanager
def peak_rss(every: float = 0.005) -> Iterator[dict[str, int]]:
    """``{"start", "peak"}`` resident set sizes (bytes) while inside the block, sampled by a thread."""
    proc = psutil.Process()
    mem = {"start": proc.memory_info().rss}
    mem["peak"] = mem["start"]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            mem["peak"] = max(mem["peak"], proc.memory_info().rss)
            time.sleep(every)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield mem
    finally:
        stop.set()
        thread.join()


class PassLog(logging.Handler):
    """Collects the ``calibration pass`` timing records of ``fxprune.progress``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.passes: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("calibration pass"):
            desc, seconds = record.args[0], record.args[3]
            self.passes.append((str(desc), float(seconds)))


def release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc keeps it mapped otherwise), so RSS drops to what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def plain_pass(model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x in data:
            model(x)
    return time.perf_counter() - start


def measure(name: str, methods: list[str], options: LstsqOptions | None, dense: torch.nn.Module,
            pruned: torch.nn.Module, data: list[torch.Tensor], passes: PassLog) -> dict:
    """One run of one setting: seconds, the reference plain pass, peak extra RSS, consumers, per-pass seconds."""
    work = copy.deepcopy(pruned)
    passes.passes.clear()
    release_freed_memory()  # so that the peak counts this setting only, not what the last one left mapped
    before = plain_pass(dense, data)  # the reference pass right before and after: robust to a drifting load
    with peak_rss() as mem:
        start = time.perf_counter()
        report = recover(dense, work, pruned.fxprune_plan, data, methods, options)
        seconds = time.perf_counter() - start
    ref = (before + plain_pass(dense, data)) / 2
    logging.getLogger("bench").warning("%s: %.1f s (plain pass %.1f s)", name, seconds, ref)
    return {"seconds": seconds, "ref": ref, "ratio": seconds / ref, "mib": (mem["peak"] - mem["start"]) / 2**20,
            "consumers": len(report["consumers"]),
            "detail": ", ".join(f"{d.removeprefix('recover ')} {s:.1f}" for d, s in passes.passes)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="run only the settings whose name contains this")
    parser.add_argument("--repeat", type=int, default=1, help="run every setting this many times, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    passes = PassLog()
    progress = logging.getLogger("fxprune.progress")
    progress.setLevel(logging.INFO)
    progress.addHandler(passes)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    data = [torch.randn(16, 3, 224, 224) for _ in range(4)]
    x = data[0][:1]
    pruned = fxprune.compile(model, {"stages": [{"target": {"flops": 0.5}, "criterion": "l2"}]}, example_inputs=x)
    dense = fxprune.trace(copy.deepcopy(model))
    fxprune.record_shapes(dense, (x,))
    plain_pass(dense, data[:1])  # warm-up
    plain = min(plain_pass(dense, data) for _ in range(2))
    pruned_plain = min(plain_pass(pruned, data) for _ in range(2))  # for the header
    settings = [s for s in SETTINGS if args.only in s[0]]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    for _ in range(args.repeat):
        for name, methods, options in settings:
            runs[name].append(measure(name, methods, options, dense, pruned, data, passes))
    rows = []
    for name, got in runs.items():
        got.sort(key=lambda r: r["ratio"])
        med = got[len(got) // 2]
        spread = f" ({got[0]['ratio']:.2f}-{got[-1]['ratio']:.2f})" if len(got) > 1 else ""
        rows.append(f"| {name} | {med['seconds']:.1f} | {med['ref']:.1f} | {med['ratio']:.2f}x{spread} | "
                    f"{max(r['mib'] for r in got):.0f} | {med['consumers']} | {med['detail']} |")
    out = [(f"resnet50 at 224, flops 0.5 (l2), 64 calibration images in 4 batches of 16, {torch.get_num_threads()} "
            f"threads, {args.repeat} interleaved run(s) per setting. Plain calibration pass (dense forward over the 64 "
            f"images): {plain:.1f} s; the pruned model's: {pruned_plain:.1f} s."), "",
           "| recover | seconds | plain pass (s) | x plain pass (range) | peak extra RSS (MiB) | consumers "
           "| passes (s) |",
           "|---|---|---|---|---|---|---|", *rows]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
