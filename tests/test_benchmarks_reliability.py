"""Smoke run of benchmarks/energy_memory.py (the full N=50 000, d=512 run gives the numbers of issue 8)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import energy_memory

from lightning_hyper.functional import hyperspherical_energy


def test_energy_memory_smoke(tmp_path, capsys):
    n, d = 1500, 64  # large enough that an N x N x d tensor (576 MB) would dwarf allocator noise
    results = energy_memory.main(["--n", str(n), "--d", str(d), "--chunk-size", "128", "--threads", "1",
                                  "--json", str(tmp_path / "out.json")])
    assert [r["mode"] for r in results] == ["forward", "forward+backward"]
    # the worker computed the energy of the seeded input, chunked: equal to the one-block energy here
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    expected = float(hyperspherical_energy(w))
    for r in results:
        assert r["energy"] == pytest.approx(expected, rel=1e-5)
        assert r["chunk_rows"] == 128 and r["seconds"] > 0
        assert 0 < r["peak_bytes"] and r["peak_above_baseline_bytes"] < r["naive_bytes"] / 10
        assert r["gram_bytes"] == n * n * 4 and r["naive_bytes"] == n * n * d * 4
    assert results[1]["grad_finite"]
    out = capsys.readouterr().out
    assert "full N x N Gram would need" in out and "forward+backward" in out
    assert (tmp_path / "out.json").exists()


def test_energy_memory_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        energy_memory.main(["--n", "0"])
