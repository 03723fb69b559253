"""The linter runs with the tests: ``ruff check`` (configured in pyproject.toml) must report nothing."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_reports_nothing():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    try:
        out = subprocess.run([*cmd, "check", "--no-cache", "lightning_hyper", "tests", "benchmarks"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' installs it")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
