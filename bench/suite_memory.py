"""Peak summed RSS and wall time of the README's test command (or any command), sampled over its process tree.

    python bench/suite_memory.py                      # pytest -n 2 --dist loadgroup -q
    python bench/suite_memory.py -- pytest tests/models -q

Every ``--interval`` seconds the resident set sizes of the command and all its descendants are summed; the peak of
that sum, the peak of any single process and the wall time are printed when the command ends. The exit code is the
command's.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time

import psutil

log = logging.getLogger("suite_memory")
README_COMMAND = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q"]


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(summed RSS, largest single RSS) of ``proc`` and its descendants, in bytes."""
    total = biggest = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += rss
        biggest = max(biggest, rss)
    return total, biggest


def measure(command: list[str], interval: float = 0.25) -> dict:
    """Run ``command``; return its exit code, wall seconds, peak summed RSS and peak single-process RSS (GB)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    proc = psutil.Process(child.pid)
    peak = {"sum": 0, "one": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, biggest = _tree_rss(proc)
            peak["sum"], peak["one"] = max(peak["sum"], total), max(peak["one"], biggest)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = child.wait()
    done.set()
    thread.join()
    return {"rc": rc, "seconds": time.perf_counter() - start, "peak_sum_gb": peak["sum"] / 1e9,
            "peak_one_gb": peak["one"] / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.25, help="sampling period in seconds")
    parser.add_argument("command", nargs="*", help="command to run (default: the README's test command)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args.command or README_COMMAND, args.interval)
    log.info("exit %d, %.0f s, peak summed RSS %.2f GB, peak single process %.2f GB",
             result["rc"], result["seconds"], result["peak_sum_gb"], result["peak_one_gb"])
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
