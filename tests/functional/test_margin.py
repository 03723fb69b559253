"""psi / Chebyshev / additive margins / λ schedule against float64 references (spec sphereface.md §2, §5, §6, §12)."""
import math

import numpy as np
import pytest
import torch
from scipy.special import comb

from lightning_hyper.functional.margin import (
    LAMBDA_PRESETS,
    additive_angular_margin,
    additive_cosine_margin,
    chebyshev_cos_m,
    lambda_schedule,
    margin_index,
    psi,
    resolve_lambda_schedule,
)

D = torch.float64


def psi_reference(theta: np.ndarray, m: int) -> np.ndarray:
    """Eq. 2.6 literally, in theta: (-1)^k cos(m theta) - 2k, k = floor(m theta / pi) clamped to m-1."""
    k = np.clip(np.floor(m * theta / np.pi), 0, m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def psi_of_theta(theta: np.ndarray, m: int) -> np.ndarray:
    return psi(torch.tensor(np.cos(theta), dtype=D), m).numpy()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_psi_matches_float64_reference_on_dense_grid(m):
    theta = np.linspace(0.0, np.pi, 200_001)
    np.testing.assert_allclose(psi_of_theta(theta, m), psi_reference(theta, m), rtol=0, atol=1e-9)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_shape_properties(m):
    theta = np.linspace(0.0, np.pi, 100_001)
    p = psi_of_theta(theta, m)
    # continuity at every segment boundary and the end points
    bounds = np.array([k * np.pi / m for k in range(m + 1)])
    np.testing.assert_allclose(psi_of_theta(bounds, m), [1 - 2 * k for k in range(m + 1)], atol=1e-12)
    assert abs(psi_of_theta(np.array([0.0]), m)[0] - 1.0) < 1e-15
    assert abs(psi_of_theta(np.array([np.pi]), m)[0] - (1 - 2 * m)) < 1e-12
    # non-increasing on the fine grid, strictly decreasing on a coarse grid
    assert np.diff(p).max() <= 1e-12
    coarse = psi_of_theta(np.linspace(0.0, np.pi, 301), m)
    assert np.all(np.diff(coarse) < 0)
    # psi <= cos theta, equality only at theta = 0 for m >= 2
    assert (p - np.cos(theta)).max() <= 1e-12
    if m >= 2:
        assert np.all(p[1:] < np.cos(theta[1:]))
    # on [0, pi/m] psi equals cos(m theta)
    first = theta <= np.pi / m
    np.testing.assert_allclose(p[first], np.cos(m * theta[first]), atol=1e-12)
    # range [1 - 2m, 1]
    assert p.min() >= 1 - 2 * m - 1e-12 and p.max() <= 1 + 1e-12


def test_psi_m1_is_identity_and_spot_values():
    c = torch.linspace(-1, 1, 1001, dtype=D)
    assert torch.equal(psi(c, 1), c)
    spot = {(4, math.pi / 3): -1.5, (4, math.pi / 2): -3.0, (4, 3 * math.pi / 4): -5.0,
            (3, math.pi / 2): -2.0, (2, math.pi / 2): -1.0}
    for (m, th), value in spot.items():
        assert psi(torch.tensor(math.cos(th), dtype=D), m).item() == pytest.approx(value, abs=1e-12)


def test_psi_decreases_with_m():
    theta = np.linspace(0.0, np.pi, 20_001)
    for m in range(1, 6):
        assert (psi_of_theta(theta, m + 1) - psi_of_theta(theta, m)).max() <= 1e-12


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7])
def test_chebyshev_equals_binomial_sum_and_cos_m_acos(m):
    c = np.linspace(-1, 1, 10_001)
    binomial = sum((-1) ** n * comb(m, 2 * n) * c ** (m - 2 * n) * (1 - c * c) ** n for n in range(m // 2 + 1))
    ours = chebyshev_cos_m(torch.tensor(c, dtype=D), m).numpy()
    np.testing.assert_allclose(ours, binomial, atol=1e-12)
    np.testing.assert_allclose(ours, np.cos(m * np.arccos(c)), atol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_margin_index_matches_floor_acos_off_boundaries(m):
    theta = np.random.default_rng(0).uniform(0, np.pi, 50_000)
    k_ref = np.clip(np.floor(m * theta / np.pi), 0, m - 1)
    k = margin_index(torch.tensor(np.cos(theta), dtype=D), m).numpy()
    away = np.abs(m * theta / np.pi - np.round(m * theta / np.pi)) > 1e-9
    np.testing.assert_array_equal(k[away], k_ref[away])
    assert not margin_index(torch.tensor([0.3], dtype=D, requires_grad=True), m).requires_grad


@pytest.mark.parametrize("m", [2, 3, 4])
def test_psi_gradcheck(m):
    c = (torch.rand(64, dtype=D) * 1.98 - 0.99).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: psi(t, m), (c,))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_gradient_finite_at_endpoints_and_zero(m):
    c = torch.tensor([1.0, -1.0, 0.0, math.cos(math.pi / m)], dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(psi(c, m).sum(), c)
    assert torch.isfinite(g).all()
    # d psi / dc = (-1)^k m U_{m-1}(c): equals m^2 at c = +-1
    assert g[0].item() == pytest.approx(m * m, rel=1e-12)
    assert g[1].item() == pytest.approx(m * m, rel=1e-12)
    # derivative against the theta-form reference: dpsi/dc = dpsi/dtheta / (dc/dtheta) = m|sin m th| / sin th
    th = 0.7
    ct = torch.tensor(math.cos(th), dtype=D, requires_grad=True)
    (gt,) = torch.autograd.grad(psi(ct, m), ct)
    assert gt.item() == pytest.approx(m * abs(math.sin(m * th)) / math.sin(th), rel=1e-10)


def test_naive_acos_psi_has_nan_gradient_at_one():
    """Documents why the polynomial form is needed (spec §2.2)."""
    c = torch.tensor([1.0], dtype=D, requires_grad=True)
    naive = torch.cos(4 * torch.acos(c))
    (g,) = torch.autograd.grad(naive.sum(), c)
    assert torch.isnan(g).all()
    (g2,) = torch.autograd.grad(psi(c, 4).sum(), c)
    assert torch.isfinite(g2).all()


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, None])
def test_bad_m_raises(bad):
    with pytest.raises((ValueError, TypeError), match=r"m=.* is not supported; accepted values: an int >= 1"):
        psi(torch.zeros(3), bad)
    with pytest.raises((ValueError, TypeError), match=r"m=.* is not supported; accepted values: an int >= 1"):
        chebyshev_cos_m(torch.zeros(3), bad)


def test_integral_float_m_accepted():
    c = torch.linspace(-1, 1, 11, dtype=D)
    assert torch.equal(psi(c, 4.0), psi(c, 4))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("theta12", [0.5, 1.5, 2.5, 3.0])
def test_binary_decision_boundary_is_theta12_over_m_plus_1(m, theta12):
    """Spec §6: x between unit W1, W2 (angle theta12) is class 1 iff psi(phi) > cos(theta12 - phi)."""
    phi = np.linspace(0.0, theta12, 400_001)
    inside = psi_of_theta(phi, m) > np.cos(theta12 - phi)
    boundary = phi[inside].max()
    assert boundary == pytest.approx(theta12 / (m + 1), abs=1e-5)


# ------------------------------------------------------------------------ additive margins
def test_additive_cosine_margin():
    c = torch.linspace(-1, 1, 101, dtype=D)
    assert torch.equal(additive_cosine_margin(c, 0.35), c - 0.35)
    with pytest.raises(ValueError, match="margin"):
        additive_cosine_margin(c, -0.1)


def test_additive_angular_margin_against_pml_and_closed_form():
    from pytorch_metric_learning.losses import ArcFaceLoss

    c = torch.linspace(-1, 1, 2001, dtype=D)
    m = 0.5
    ours = additive_angular_margin(c, m)
    theta = torch.acos(c)
    ref = torch.where(theta <= math.pi - m, torch.cos(theta + m), c - m * math.sin(m))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    pml = ArcFaceLoss(num_classes=3, embedding_size=2, margin=math.degrees(m))
    torch.testing.assert_close(ours, pml.modify_cosine_of_target_classes(c), rtol=0, atol=1e-12)
    assert np.all(np.diff(ours.numpy()) >= -1e-15)  # non-decreasing in c = non-increasing in theta
    assert (ours <= c + 1e-15).all()
    cg = torch.tensor([1.0, -1.0, 0.3], dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(additive_angular_margin(cg, m).sum(), cg)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="margin"):
        additive_angular_margin(c, 4.0)


# ---------------------------------------------------------------------------- λ schedule
@pytest.mark.parametrize(
    "preset,step,expected",
    [
        ("sphereface", 1, 892.857), ("sphereface", 10, 454.545), ("sphereface", 100, 76.923),
        ("sphereface", 1000, 8.2645), ("sphereface", 1658, 5.0010), ("sphereface", 1659, 5.0),
        ("sphereface", 28000, 5.0),
        ("lsoftmax_mnist", 1000, 421.37), ("lsoftmax_mnist", 5000, 16.205),
        ("lsoftmax_mnist", 10000, 0.40565), ("lsoftmax_mnist", 18000, 0.0022497),
    ],
)
def test_lambda_schedule_reference_values(preset, step, expected):
    assert lambda_schedule(step, **LAMBDA_PRESETS[preset]) == pytest.approx(expected, rel=1e-4)


def test_lambda_schedule_variants():
    p = resolve_lambda_schedule("sphereface", lambda_min=0.0)
    assert lambda_schedule(16000, **p) == pytest.approx(0.5206, rel=1e-3)
    assert lambda_schedule(28000, **p) == pytest.approx(0.2975, rel=1e-3)
    port = LAMBDA_PRESETS["pytorch_port"]
    assert lambda_schedule(2989, **port) > 5.0 and lambda_schedule(2991, **port) == 5.0
    assert lambda_schedule(1, **LAMBDA_PRESETS["none"]) == 0.0
    assert lambda_schedule(10**6, **resolve_lambda_schedule("constant", base=2.5)) == 2.5
    # default arguments are the sphereface preset
    assert lambda_schedule(123) == lambda_schedule(123, **LAMBDA_PRESETS["sphereface"])
    with pytest.raises(ValueError, match="lambda_schedule='bogus'.*accepted values"):
        resolve_lambda_schedule("bogus")
    with pytest.raises(ValueError, match="step"):
        lambda_schedule(-1)
