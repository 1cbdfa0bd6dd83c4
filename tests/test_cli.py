"""The command line: ``python -m fxprune demo --quick``, ``prune`` + ``fxprune.load``, and its exit codes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxprune
from fxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _row(text: str, label: str) -> list[str]:
    """The cells (before, after, ratio) of the table row starting with ``label``."""
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line[len(label):].split()[-3:]


def test_demo_quick_trains_prunes_and_reports() -> None:
    proc = _run("demo", "--quick", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    before, after, _ = _row(out, "test accuracy (after fine-tuning)")
    assert float(before.rstrip("%")) > 80 and float(after.rstrip("%")) > 80
    assert re.search(r"test accuracy right after pruning, before fine-tuning: \d+\.\d\d%", out)
    macs_ratio = float(_row(out, "MACs")[2].rstrip("x"))
    assert 0.45 < macs_ratio < 0.55  # the default recipe removes half the MACs
    assert float(_row(out, "params")[2].rstrip("x")) < 1
    assert "CPU latency" in out and "frozen groups:" in out


def test_prune_saves_a_file_that_loads_like_a_fresh_compile(tmp_path: Path) -> None:
    out = tmp_path / "m.fxp"
    proc = _run("prune", "torchvision:resnet18", "--input-size", "32", "--target", "flops=0.5", "--runs", "3",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(_row(proc.stdout, "MACs")[2].rstrip("x")) < 0.55
    assert f"saved to {out}" in proc.stdout and out.is_file()
    torch.manual_seed(0)  # the CLI's --seed default: same random weights and input
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    fresh = fxprune.compile(model, {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2"}]},
                            example_inputs=x)
    loaded = fxprune.load(out, torchvision.models.resnet18, x)
    assert loaded.fxprune_plan.kept == fresh.fxprune_plan.kept
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fresh(x), atol=1e-5, rtol=1e-5)


def test_prune_with_an_inline_recipe_of_every_graph_rewriting_kind(tmp_path: Path, capsys) -> None:
    """``--recipe`` as YAML text, with stage kinds that have no channel target (heads, blocksparse, patches)."""
    out = tmp_path / "vit.fxp"
    recipe = ("stages: [{kind: heads, target: {sparsity: 0.5}}, "
              "{kind: blocksparse, target: {sparsity: 0.5}, block: [16, 16], criterion: l2}, "
              "{kind: patches, keep: 0.5}]")
    code = main(["prune", "timm:deit_tiny_patch16_224", "--input-size", "64", "--recipe", recipe, "--runs", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "heads sparsity=0.5 by l2; blocksparse sparsity=0.5 by l2; patches keep=0.5" in printed
    assert float(_row(printed, "MACs")[2].rstrip("x")) < 0.4
    assert out.is_file()


def test_bad_argument_exits_2_with_a_message() -> None:
    proc = _run("prune", "torchvision:resnet18", "--target", "flop=0.5")
    assert proc.returncode == 2
    assert "argument --target: 'flop=0.5' is not a target" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["prune", "torchvision:resnet1"], "torchvision has no classification model 'resnet1' (did you mean resnet18"),
    (["prune", "resnet18"], "use torchvision:<name>"),
    (["prune", "torchvision:resnet18", "--target", "flops=1.5"], "must be in [0, 1)"),
    (["prune", "torchvision:resnet18", "--criterion", "l3"], "unknown criterion 'l3'"),
    (["prune", "torchvision:resnet18", "--recipe", "nope.yaml"], "recipe file 'nope.yaml' does not exist"),
    (["prune", "torchvision:resnet18", "--input-size", "0"], "expected a positive integer"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_errors_in_process(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_pruning_failure_exits_1_and_verbose_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "frozen.yaml"
    recipe.write_text("stages:\n  - kind: channels\n    target: {flops: 0.5}\n    ignore: ['*']\n")
    argv = ["prune", "torchvision:resnet18", "--input-size", "32", "--recipe", str(recipe), "--runs", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "fxprune prune: error: BudgetError: flops target" in err and "Traceback" not in err
    assert main([*argv, "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_help_lists_the_commands_and_no_command_is_an_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "prune" in out and "demo" in out
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0 and "--input-size" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage: fxprune" in capsys.readouterr().err
