"""DH2L metrics (functional/discrete.py) against float64 loop references written from the paper's formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_hyper.functional import hyperspherical_energy, pairwise_angles
from tests.memory import peak_rss_delta
from lightning_hyper.functional.discrete import (
    DH2L_METRICS,
    METRIC_DIRECTIONS,
    METRICS,
    discrete_similarity,
    grouped_metric_energy,
    metric_energy,
    metric_energy_from_labels,
    pairwise_metric,
    pairwise_term,
    sign_ste,
)

C99 = math.acos(0.99) / math.pi  # the clamped angle of identical vectors, ~0.0450


# ----------------------------------------------------------------------------- float64 reference
def ref_metric(wi, wj, metric, clamp=0.99, discrete="binary", gm="product"):
    """One pair, straight from eq. 8-11 (DH2L 000/001) with loops."""
    wi, wj = np.asarray(wi, float), np.asarray(wj, float)
    d = len(wi)
    base, primed = metric.rstrip("'"), metric.endswith("'")
    if metric == "cosine":
        return float(wi @ wj / np.linalg.norm(wi) / np.linalg.norm(wj))
    cos = sum(wi[k] * wj[k] for k in range(d)) / math.sqrt(sum(v * v for v in wi)) / math.sqrt(sum(v * v for v in wj))
    if metric == "N-euclidean2":
        return 1.0 / (2 - 2 * cos + 1e-6)
    if metric == "angular2":
        return math.acos(min(max(cos, -1 + 1e-6), 1 - 1e-6)) ** -2
    ternary = base == "ter" or (base not in ("bin", "ter") and discrete == "ternary")

    def sgn(x):
        if ternary:
            return 1 if x > 0 else (-1 if x < 0 else 0)
        return 1 if x >= 0 else -1

    dh = sum(sgn(wi[k]) * sgn(wj[k]) for k in range(d)) / d
    a = math.acos(min(max(dh, -clamp), clamp)) / math.pi if primed else (1 - dh) / 2
    b = math.acos(min(max(cos, -clamp), clamp)) / math.pi
    if base in ("bin", "ter"):
        return a
    if base == "angular":
        return b
    am = (a + b) / 2
    gmv = a * b if gm == "product" else math.sqrt(a * b)
    hm = 2 * a * b / (a + b) if a + b > 0 else 0.0
    table = {"AM": am, "GM": gmv, "HM": hm}
    if base in table:
        return table[base]
    if base.startswith("cos("):
        return (math.cos(math.pi * table[base[4:-1]]) + 1) / 2
    u, v = math.cos(math.pi * a) + 1, math.cos(math.pi * b) + 1
    return {"AMcos": (u + v) / 4, "GMcos": u * v / 4, "HMcos": u * v / (u + v) if u + v > 0 else 0.0}[base]


def ref_matrix(x, y, metric, **kw):
    return np.array([[ref_metric(a, b, metric, **kw) for b in y] for a in x])


def random_rows(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- hand-computed values
def test_hand_computed_orthogonal_pair():
    """w1=(1,1,1,1), w2=(1,1,-1,-1): D_h = 0 -> a = 1/2; cos = 0 -> b = 1/2 (values worked out by hand)."""
    x = torch.tensor([[1.0, 1, 1, 1]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1, -1, -1]], dtype=torch.float64)
    expected = {
        "bin": 0.5, "ter": 0.5, "bin'": 0.5, "angular": 0.5, "AM": 0.5, "GM": 0.25, "HM": 0.5,
        "cos(AM)": 0.5, "cos(GM)": (math.cos(math.pi / 4) + 1) / 2, "cos(HM)": 0.5,
        "AMcos": 0.5, "GMcos": 0.25, "HMcos": 0.5, "AM'": 0.5, "GMcos'": 0.25, "cosine": 0.0,
        "N-euclidean2": 1 / (2 + 1e-6), "angular2": (math.pi / 2) ** -2,
    }
    for metric, value in expected.items():
        assert pairwise_metric(x, y, metric).item() == pytest.approx(value, abs=1e-9), metric


@pytest.mark.parametrize("metric", DH2L_METRICS)
def test_negation_and_self_cases(metric):
    """w with itself: D_h = 1 (a = 0, a' = b = acos(.99)/pi); w with -w: D_h = -1 (a = 1, a' = b = 1 - that)."""
    w = torch.tensor([[1.0, 2.0, -3.0, 0.5, -0.25]], dtype=torch.float64)  # no zero entry: sign(-w) = -sign(w)
    primed = metric.endswith("'")
    for other, a, b in ((w, C99 if primed else 0.0, C99), (-w, 1 - C99 if primed else 1.0, 1 - C99)):
        base = metric.rstrip("'")
        if base in ("bin", "ter"):
            expected = a
        elif base == "angular":
            expected = b
        else:
            expected = ref_metric(w[0], other[0], metric)
        assert pairwise_metric(w, other, metric).item() == pytest.approx(expected, abs=1e-12)
    assert discrete_similarity(w, -w).item() == -1.0
    assert discrete_similarity(w, w).item() == 1.0
    # exact values with clamp=1: distances are 0 for w, w and 1 for w, -w; similarities the reverse
    kind = METRIC_DIRECTIONS[metric]
    same, opposite = (pairwise_metric(w, o, metric, clamp=1.0).item() for o in (w, -w))
    assert (same, opposite) == pytest.approx((0.0, 1.0) if kind == "distance" else (1.0, 0.0), abs=1e-7)


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_matches_loop_reference(metric):
    x, y = random_rows(5, 7, 1), random_rows(4, 7, 2)
    got = pairwise_metric(x, y, metric).numpy()
    np.testing.assert_allclose(got, ref_matrix(x.numpy(), y.numpy(), metric), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", ["AM", "HM'", "cos(GM)", "HMcos", "GMcos'"])
@pytest.mark.parametrize("discrete,gm", [("ternary", "product"), ("binary", "sqrt")])
def test_options_match_reference(metric, discrete, gm):
    x = random_rows(6, 5, 3)
    x[0, 1] = 0.0  # a ternary zero
    got = pairwise_metric(x, None, metric, discrete=discrete, gm=gm).numpy()
    np.testing.assert_allclose(got, ref_matrix(x.numpy(), x.numpy(), metric, discrete=discrete, gm=gm),
                               rtol=1e-9, atol=1e-12)


def test_ternary_sign_and_threshold():
    x = torch.tensor([[-2.0, -0.1, 0.0, 0.1, 2.0]])
    assert sign_ste(x).tolist() == [[-1, -1, 1, 1, 1]]  # binary: sign(0) = +1 (eq. 8)
    assert sign_ste(x, ternary=True).tolist() == [[-1, -1, 0, 1, 1]]
    # dead zone 0.7 * mean|x| = 0.7 * 0.84 = 0.588
    assert sign_ste(x, ternary=True, threshold=0.7).tolist() == [[-1, 0, 0, 0, 1]]
    y = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    assert pairwise_metric(y, y, "ter").item() == pytest.approx((1 - 3 / 4) / 2)  # one zero: D_h = 3/4


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("metric", DH2L_METRICS)
def test_range_and_symmetry(metric):
    x = torch.cat([random_rows(30, 6, 4), random_rows(2, 6, 5) * 1e-3, -random_rows(1, 6, 4)])
    m = pairwise_metric(x, None, metric)
    assert bool(((m >= 0) & (m <= 1)).all())
    torch.testing.assert_close(m, m.T)
    y = random_rows(3, 6, 6)
    torch.testing.assert_close(pairwise_metric(x, y, metric), pairwise_metric(y, x, metric).T)


@pytest.mark.parametrize("metric", METRICS)
def test_term_direction(metric):
    """The minimized term is larger for w with itself than for w with -w (minimizing pushes apart)."""
    w = torch.tensor([[0.3, -1.2, 0.7, 2.0]])
    near = pairwise_term(w, w * 2, metric).item()
    far = pairwise_term(w, -w, metric).item()
    assert near > far


# ----------------------------------------------------------------------------- gradients
def test_ste_gradient_is_saturated():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    (sign_ste(x) * torch.arange(1.0, 8.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]  # passes where |w| <= 1, zero elsewhere
    x.grad = None
    sign_ste(x, ternary=True).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_discrete_similarity_gradient_through_ste():
    x = torch.tensor([[0.5, -2.0, 0.1], [-0.3, 0.9, 3.0]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]])
    discrete_similarity(x, y).sum().backward()
    expected = (x.detach().abs() <= 1).float() * torch.sign(y).sum(0) / 3  # d/dx_i[k] sum_j s_i[k] s_j[k] / d
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("metric", METRICS)
def test_gradients_finite_for_identical_and_opposite_rows(metric):
    w = random_rows(3, 4, 7)
    x = torch.cat([w, w, -w]).requires_grad_(True)  # identical and antipodal pairs
    metric_energy(x, metric).backward()
    assert bool(torch.isfinite(x.grad).all())


def test_arccos_argument_clamped_to_099():
    """theta = arccos(clamp(cos, -0.99, 0.99))/pi: value saturates and the gradient is zero past the clamp."""
    ref = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for c, clamped in ((0.995, True), (-0.999, True), (0.5, False), (-0.98, False)):
        x = torch.tensor([[c, math.sqrt(1 - c * c)]], dtype=torch.float64, requires_grad=True)
        theta = pairwise_metric(x, ref, "angular")
        assert theta.item() == pytest.approx(math.acos(max(-0.99, min(0.99, c))) / math.pi, abs=1e-12)
        theta.sum().backward()
        assert bool(torch.isfinite(x.grad).all()) and (x.grad.abs().sum().item() == 0.0) == clamped, c


def test_continuous_gradient_matches_gradcheck():
    x = random_rows(4, 5, 8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: metric_energy(t, "angular"), (x,))
    assert torch.autograd.gradcheck(lambda t: metric_energy(t, "cosine"), (x,))


# ----------------------------------------------------------------------------- energies
@pytest.mark.parametrize("metric", METRICS)
def test_metric_energy_is_mean_of_terms(metric):
    x = random_rows(6, 5, 9)
    t = np.array([[ref_metric(a, b, metric) for b in x.numpy()] for a in x.numpy()])
    if METRIC_DIRECTIONS[metric] == "distance":
        t = 1 - t
    expected = (t.sum() - np.trace(t)) / 30
    assert metric_energy(x, metric).item() == pytest.approx(expected, rel=1e-6)
    assert metric_energy(x, metric, reduction="sum").item() == pytest.approx(expected * 30, rel=1e-6)


def test_baselines_reuse_mhe_energies():
    x = random_rows(7, 4, 10)
    assert metric_energy(x, "N-euclidean2").item() == hyperspherical_energy(x, s=2.0).item()
    assert metric_energy(x, "angular2").item() == hyperspherical_energy(x, s=2.0, metric="angular").item()


def test_metric_energy_small_and_float32():
    with pytest.warns(UserWarning, match="form no pair"):
        assert metric_energy(torch.randn(1, 4), "AM").item() == 0.0
    x = torch.randn(5, 3)
    assert metric_energy(x, "HMcos").dtype == torch.float32
    assert metric_energy(x.double(), "HMcos").item() == pytest.approx(metric_energy(x, "HMcos").item(), rel=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_minimizing_energy_increases_mean_angle(metric):
    """Direction test: gradient descent on the energy from a random start spreads the vectors."""
    torch.manual_seed(0)
    w = (torch.randn(6, 8) * 0.3 + 0.4).requires_grad_(True)  # random, all in one half-space
    before = pairwise_angles(w.detach()).mean().item()
    d_before = pairwise_metric(w.detach(), None, "bin").mean().item()
    opt = torch.optim.SGD([w], lr=0.2)
    for _ in range(60):
        opt.zero_grad()
        metric_energy(w, metric).backward()
        opt.step()
    assert pairwise_angles(w.detach()).mean().item() > before + 0.05
    if metric.rstrip("'") in ("bin", "ter"):
        assert pairwise_metric(w.detach(), None, "bin").mean().item() > d_before


def test_grouped_energy_against_loops():
    x = random_rows(7, 5, 11)
    groups = [2, 0, 2, 1, 0, 2, 5]  # group 1 and 5 have a single row: no pair, left out
    t = 1 - ref_matrix(x.numpy(), x.numpy(), "AM")
    per_group = []
    for g in (0, 2):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        per_group.append(np.mean([t[i, j] for i in idx for j in idx if i != j]))
    assert grouped_metric_energy(x, groups, "AM").item() == pytest.approx(np.mean(per_group), rel=1e-9)


def test_grouped_energy_single_rows_is_zero_not_nan():
    x = random_rows(3, 4, 12).requires_grad_(True)
    out = grouped_metric_energy(x, [0, 1, 2], "HMcos")
    out.backward()
    assert out.item() == 0.0 and bool(torch.isfinite(x.grad).all())


def test_energy_from_labels_against_loops():
    w = random_rows(5, 4, 13)
    labels = torch.tensor([1, 3, 1])
    t = ref_matrix(w.numpy(), w.numpy(), "AMcos")
    expected = np.mean([sum(t[y, j] for j in range(5) if j != y) / 4 for y in labels.tolist()])
    assert metric_energy_from_labels(w, labels, "AMcos").item() == pytest.approx(expected, rel=1e-9)
    uniq = np.mean([sum(t[y, j] for j in range(5) if j != y) / 4 for y in (1, 3)])
    assert metric_energy_from_labels(w, labels, "AMcos", unique=True).item() == pytest.approx(uniq, rel=1e-9)
    with pytest.raises(ValueError, match=r"labels=<class indices in range .*> is not supported; "
                                         r"accepted values: class indices in \[0, 4\]"):
        metric_energy_from_labels(w, torch.tensor([5]), "AM")


def test_no_dense_pair_tensor_for_large_layers():
    """512 neurons of a 3x3x256 conv: the metric is Gram-based, so forward + backward stay far below
    one float32 N x N x d tensor (2.4 GB; measured peak about 80 MB, first call included)."""
    n, d = 512, 2304
    w = torch.randn(n, d, requires_grad=True)

    def run():
        metric_energy(w, "HMcos").backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = peak_rss_delta(run)
    finally:
        torch.set_num_threads(threads)
    assert bool(torch.isfinite(w.grad).all()) and w.grad.abs().sum() > 0
    assert peak < n * n * d * 4 / 20, f"peak {peak / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- errors
def test_errors_name_argument_and_accepted_values():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"metric='euclid' is not supported; accepted values: \[.*'bin'.*'HMcos'.*"
                                         r"'N-euclidean2'"):
        pairwise_metric(x, None, "euclid")
    assert pairwise_metric(x, None, "AM_prime").equal(pairwise_metric(x, None, "AM'"))
    with pytest.raises(ValueError, match="discrete="):
        pairwise_metric(x, None, "AM", discrete="quaternary")
    with pytest.raises(ValueError, match="gm="):
        pairwise_metric(x, None, "GM", gm="log")
    with pytest.raises(ValueError, match="clamp="):
        pairwise_metric(x, None, "AM", clamp=1.5)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, d\)"):
        pairwise_metric(torch.randn(4), None, "AM")
    with pytest.raises(ValueError, match=r"y: expected shape \(M, 4\)"):
        pairwise_metric(x, torch.randn(2, 5), "AM")
    with pytest.raises(ValueError, match="zero vectors"):
        metric_energy(torch.zeros(2, 3), "AM")
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric_energy(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), "AM")
    with pytest.raises(ValueError, match="groups: expected 3 integer group ids"):
        grouped_metric_energy(x, [0, 1], "AM")
    with pytest.raises(ValueError, match="reduction="):
        metric_energy(x, "AM", reduction="max")
    with pytest.raises(TypeError, match="x: expected a Tensor"):
        sign_ste([1.0, 2.0])
