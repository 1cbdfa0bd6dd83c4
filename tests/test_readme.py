"""The first Python example of README.md runs as written (ResNet-50 at 224x224 takes a few seconds on one CPU core,
so it is not scaled down)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fxprune

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its plan file to the working directory
    code = _first_python_block()
    assert "fxprune.compile(" in code
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    printed = capsys.readouterr().out
    assert "MACs" in printed and "params" in printed  # the report table was printed
    model, pruned, x = namespace["model"], namespace["pruned"], namespace["x"]
    rep = fxprune.report(model, pruned, x)
    assert abs(rep.macs_ratio - 0.5) < 0.02  # the recipe's flops: 0.5
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1 and fxprune.Plan.load(saved[0]).kept == pruned.fxprune_plan.kept
