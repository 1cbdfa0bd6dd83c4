"""The suite fails fast: a crashed worker (the OOM killer's SIGKILL) or a hung test ends the whole run within a
minute, naming the test, instead of leaving pytest-xdist waiting on an empty queue.

Each case runs the README's test command in a subprocess on a throw-away project that carries this repository's
``pyproject.toml`` and ``tests/conftest.py`` unchanged, so the policy under test is the one the real suite uses.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The innocent tests sleep, so the run outlives the crash unless the crash ends it.
SLOW_TESTS = "".join(f"def test_sleeps_{i}():\n    time.sleep(2)\n\n\n" for i in range(40))


def _project(tmp_path: Path, body: str) -> Path:
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_victim.py").write_text("import os\nimport signal\nimport time\n\nimport pytest\n\n\n"
                                                       + textwrap.dedent(body) + "\n\n" + SLOW_TESTS)
    return tmp_path


def _passed(out: str) -> int:
    found = re.search(r"(\d+) passed", out)
    return int(found.group(1)) if found else 0


def _run(project: Path) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:randomly"],
                          cwd=project, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


@pytest.mark.xdist_group("failfast")
def test_killed_worker_fails_the_run_at_once(tmp_path: Path) -> None:
    code, out, seconds = _run(_project(tmp_path, """
        def test_dies():
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    assert code != 0, out
    assert "crashed while running 'tests/test_victim.py::test_dies'" in out, out  # the crashed test is named
    # 40 tests of 2 s on 2 workers would take 40 s if the run went on: it stops at the crash instead
    assert seconds < 60, f"run took {seconds:.0f} s after a worker was killed"
    assert _passed(out) < 40, out


@pytest.mark.xdist_group("failfast")
def test_hung_test_fails_the_run(tmp_path: Path) -> None:
    code, out, seconds = _run(_project(tmp_path, """
        @pytest.mark.timeout(3)
        def test_hangs():
            time.sleep(3600)
    """))
    assert code != 0, out
    # pytest-timeout's thread method dumps the stacks and ends the worker: reported as a crash in that test
    assert "crashed while running 'tests/test_victim.py::test_hangs'" in out, out
    assert _passed(out) < 40, out
    assert seconds < 60, f"run took {seconds:.0f} s after a test hung"
