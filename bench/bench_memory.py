"""Peak memory of ``fxprune.compile`` on torchvision's vit_b_16, relative to the model's parameter bytes.

Run: ``pytest bench/bench_memory.py --benchmark-only -q -s`` (or ``python bench/bench_memory.py``).
The compile runs in a fresh subprocess; the peak resident set size above the level after building the model is
compared with the parameter bytes (target: below 3x, since compile holds one working copy of the model).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, torch, torchvision, fxprune
torch.set_num_threads(1)
model = torchvision.models.vit_b_16(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pruned = fxprune.compile(model, {"stages": [{"target": {"sparsity": 0.5}}]}, example_inputs=x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"param_bytes": param_bytes, "peak_extra_bytes": peak - before}))
"""


def measure() -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["ratio"] = result["peak_extra_bytes"] / result["param_bytes"]
    return result


@pytest.mark.benchmark(group="memory")
def test_compile_peak_memory_vit_b_16(benchmark) -> None:
    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["ratio"] < 3.0, result


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
