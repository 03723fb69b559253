"""Smoke runs of the SphereNet / DCNet benchmark scripts (the full runs are reported, not tested)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_operator_speed_smoke(capsys):
    results = load("operator_speed").main(["--smoke", "--device", "cpu", "--threads", "1"])
    assert len(results) == 8 and all(r > 0 for _, _, r in results)
    assert "SphereConv2d(cosine)" in capsys.readouterr().out


def test_spherenet_convergence_smoke(capsys):
    results = load("spherenet_convergence").main(["--smoke"])
    assert set(results) == {"plain CNN + BN", "SphereNet cosine + BN"}
    assert all(0 <= a <= 1 for v in results.values() for accs in v for a in accs)
    assert "it 5" in capsys.readouterr().out


def test_dcnet_robustness_smoke(capsys):
    results = load("dcnet_robustness").main(["--smoke"])
    assert set(results) == {"baseline CNN", "TanhConv"}
    assert "FGSM" in capsys.readouterr().out


def test_attacks_respect_the_budget_and_hurt_a_linear_model():
    mod = load("dcnet_robustness")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(32, 1, 4, 4)
    y = model(x).argmax(1)  # the model is right on every clean point
    eps = 0.1
    x_f = mod.fgsm(model, x, y, eps)
    x_b = mod.bim(model, x, y, eps, eps / 4, iters=10)
    for adv in (x_f, x_b):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = lambda xx: nn.functional.cross_entropy(model(xx), y)  # noqa: E731
    assert loss(x_f) > loss(x) and loss(x_b) >= loss(x_f) - 1e-6
    # FGSM on a linear model: every unclipped coordinate moves by exactly +-eps in the gradient's sign
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xg), xg)
    inside = (x + eps * g.sign() >= 0) & (x + eps * g.sign() <= 1) & (g != 0)
    torch.testing.assert_close((x_f - x)[inside], eps * g.sign()[inside])
