"""Under CI a test may skip only for an opt-in check (tests.utils.opt_in); any other skip fails the run."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.utils import REPO

CASES = """
import pytest
from tests.utils import opt_in


def test_plain_skip():
    pytest.skip("fixtures not found")


@pytest.mark.skipif(True, reason="no reason given")
def test_plain_skipif():
    pass


def test_opt_in_skip():
    pytest.skip(opt_in("the llama.cpp build", "make check-llamacpp"))


@pytest.mark.xfail(reason="known")
def test_xfail():
    raise AssertionError
"""
HOOKS = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"


def run_cases(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(CASES, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(HOOKS, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", str(tmp_path)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_outside_ci_skips_are_reported(tmp_path):
    run = run_cases(tmp_path, ci=False)
    out = run.stdout
    assert run.returncode == 0 and "3 skipped, 1 xfailed" in out, out
    assert "opt-in: needs the llama.cpp build; run `make check-llamacpp`" in out, out


def test_under_ci_only_opt_in_skips_pass(tmp_path):
    run = run_cases(tmp_path, ci=True)
    out = run.stdout
    assert run.returncode == 1 and "1 failed, 1 skipped, 1 xfailed" in out and "1 error" in out, out
    assert "FAILED test_cases.py::test_plain_skip " in out and "ERROR test_cases.py::test_plain_skipif" in out, out
    assert "unexpected skip under CI (only opt-in skips are allowed): Skipped: fixtures not found" in out, out
