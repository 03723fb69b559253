"""benchmarks/imbalance_claims.py: the imbalance protocols (single / multiple), the neuron-gap metric, a smoke run."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import imbalance_claims as ic


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_keep_fractions_follow_the_thesis_protocols():
    assert ic.keep_fractions("single") == [0.1] + [1.0] * 9
    assert ic.keep_fractions("multiple") == pytest.approx([(k + 1) / 10 for k in range(10)])
    with pytest.raises(ValueError, match="accepted values"):
        ic.keep_fractions("none")


def test_imbalanced_indices_counts_and_pairing():
    y = torch.arange(10).repeat_interleave(30)  # 30 samples per class
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    single = ic.imbalanced_indices(y, ic.keep_fractions("single"), 20, gen())
    counts = torch.bincount(y[single], minlength=10).tolist()
    assert counts == [2] + [20] * 9  # class 0 keeps 10 % of its pool of 20
    multiple = ic.imbalanced_indices(y, ic.keep_fractions("multiple"), 20, gen())
    assert torch.bincount(y[multiple], minlength=10).tolist() == [2 * (k + 1) for k in range(10)]
    assert torch.equal(single, ic.imbalanced_indices(y, ic.keep_fractions("single"), 20, gen()))  # same seed
    with pytest.raises(ValueError, match="pool_per_class"):
        ic.imbalanced_indices(y, ic.keep_fractions("single"), 31, gen())


def test_min_angle_degrees():
    angles = torch.tensor([0.0, 36.0, 72.0, 150.0])
    w = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1) * 3.0
    assert ic.min_angle_degrees(w) == pytest.approx(36.0, abs=1e-4)
    regular = torch.stack([torch.cos(torch.arange(10) * 2 * math.pi / 10),
                           torch.sin(torch.arange(10) * 2 * math.pi / 10)], 1)
    assert ic.min_angle_degrees(regular) == pytest.approx(36.0, abs=1e-4)


def test_smoke_run_pairs_both_arms(capsys):
    res = ic.main(["--smoke"])
    assert set(res) == {"single", "multiple", "toy"}
    for _setting, arms in res.items():
        assert set(arms) == set(ic.VARIANTS)
        for metrics in arms.values():
            assert all(len(v) == 1 and math.isfinite(v[0]) for v in metrics.values())
    assert set(res["toy"]["mhe"]) == {"min_angle", "minority_recall", "accuracy"}
    assert set(res["single"]["baseline"]) == {"error", "minority_error", "train_size"}
    assert res["single"]["baseline"]["train_size"] == res["single"]["mhe"]["train_size"]
    assert "toy" in capsys.readouterr().out
