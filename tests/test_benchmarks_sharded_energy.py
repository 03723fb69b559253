"""benchmarks/sharded_energy.py --smoke: both methods run on 2 gloo processes, agree, and the report prints
the ring/gather ratios (issue 17)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.spawn
@pytest.mark.timeout(300)
def test_smoke_run_reports_ratios_and_equal_energies():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded_energy.py"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("300 ")]
    assert [r[2] for r in rows] == ["gather", "ring"], out
    assert float(rows[0][5]) == pytest.approx(float(rows[1][5]), rel=1e-6)  # the same energy
    assert 0.3 < float(rows[0][5]) < 1.0  # ~0.5 for random directions in d=16, s=2
    ratio = next(line for line in out.splitlines() if line.strip().startswith("N=300:"))
    assert "time x" in ratio and "memory x" in ratio and "energy rel. diff" in ratio
