"""``bench/gpu_suite.sh --dry-run``: on CPU, every section of the one-shot GPU suite resolves its providers and the
markdown report is written (interpreter-sized problems; the real figures need a CUDA machine)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.xdist_group("gpu-suite-dry-run")
def test_gpu_suite_dry_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    env = {**os.environ, "FXPRUNE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=170)
    text = out.read_text()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:] + text[-3000:]
    for section in ("Kernel tests", "Block-sparse linear", "Gathered attention", "End to end ViT-B/16",
                    "Latency-target plan"):
        assert f"## {section}" in text
    assert "FAILED" not in text and "ours_ms" in text and "efficiency" in text
