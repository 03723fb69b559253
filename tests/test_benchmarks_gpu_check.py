"""benchmarks/gpu_check.py: its correctness cases hold on CPU too (float32 against float64), and without
CUDA it skips cleanly with exit status 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.usefixtures("one_thread")
def test_every_custom_autograd_case_agrees_in_float32_on_cpu():
    rows = gpu_check.check_correctness("cpu")
    assert len(rows) >= 15
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad


def test_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run its checks")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
