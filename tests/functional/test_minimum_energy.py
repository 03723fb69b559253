"""``minimum_energy``: closed-form minima of the hyperspherical energy, checked against float64 NumPy
energies of explicitly built optimal configurations, the library's own energy, and the Thomson problem."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_hyper.functional import hyperspherical_energy, minimum_energy

S_VALUES = (0.0, 0.5, 1.0, 2.0, 3.5)


def _np_energy(points: np.ndarray, s: float, metric: str = "euclidean", half_space: bool = False,
               angle_unit: str = "radian", eps: float = 1e-6) -> float:
    """Independent float64 loop: mean over ordered pairs i != j of f(dist) (s = 0: log(1/dist)); the same
    eps conventions as the library (added to the squared chord; cosine clamp for the angular metric)."""
    w = points / np.linalg.norm(points, axis=1, keepdims=True)
    n = len(w)
    if half_space:
        w = np.concatenate([w, -w])
    scale = math.pi if angle_unit == "pi" else 1.0
    total, count = 0.0, 0
    for i, j in itertools.permutations(range(len(w)), 2):
        antipodal = half_space and abs(i - j) == n
        if metric == "euclidean":
            dist = math.sqrt(4.0 + eps) if antipodal else math.sqrt(float(((w[i] - w[j]) ** 2).sum()) + eps)
        else:
            cos = float(np.clip(w[i] @ w[j], -1 + eps, 1 - eps))
            dist = (math.pi if antipodal else math.acos(cos)) / scale
        total += math.log(1 / dist) if s == 0 else dist ** (-s)
        count += 1
    return total / count


def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _simplex(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors in R^d (n <= d + 1), pairwise cosine -1/(n-1): the centred standard basis of R^n,
    written in an orthonormal basis of its (n-1)-dim span, padded to d dims, randomly rotated and scaled."""
    centred = np.eye(n) - 1.0 / n
    basis = np.linalg.svd(centred)[2][: n - 1]  # orthonormal rows spanning the sum-zero subspace
    coords = centred @ basis.T  # (n, n-1)
    points = np.zeros((n, d))
    points[:, : n - 1] = coords / np.linalg.norm(coords, axis=1, keepdims=True)
    return (points @ _rotation(d, rng).T) * rng.uniform(0.5, 3.0, size=(n, 1))


def _frame(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n <= d orthogonal vectors of random norms in a random orientation."""
    return _rotation(d, rng)[:n] * rng.uniform(0.5, 3.0, size=(n, 1))


@pytest.mark.parametrize("n,d", [(2, 1), (2, 3), (3, 2), (4, 3), (5, 8), (9, 8), (10, 16)])
@pytest.mark.parametrize("s", S_VALUES)
def test_full_space_minimum_is_the_regular_simplex(n, d, s):
    rng = np.random.default_rng(n * 100 + d)
    points = _simplex(n, d, rng)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    off = (unit @ unit.T)[~np.eye(n, dtype=bool)]
    np.testing.assert_allclose(off, -1.0 / (n - 1), atol=1e-12)  # really the regular simplex
    expected = _np_energy(points, s)
    assert minimum_energy(n, d, s=s) == pytest.approx(expected, rel=1e-12)
    library = float(hyperspherical_energy(torch.from_numpy(points), s=s))
    assert minimum_energy(n, d, s=s) == pytest.approx(library, rel=1e-10)


@pytest.mark.parametrize("n,d", [(2, 2), (3, 3), (4, 9), (8, 8)])
@pytest.mark.parametrize("metric,angle_unit", [("euclidean", "radian"), ("angular", "radian"), ("angular", "pi")])
@pytest.mark.parametrize("s", S_VALUES)
def test_half_space_minimum_is_an_orthonormal_frame(n, d, metric, angle_unit, s):
    rng = np.random.default_rng(n * 100 + d)
    points = _frame(n, d, rng)
    value = minimum_energy(n, d, s=s, metric=metric, half_space=True, angle_unit=angle_unit)
    assert value == pytest.approx(_np_energy(points, s, metric, True, angle_unit), rel=1e-12)
    library = float(hyperspherical_energy(torch.from_numpy(points), s=s, metric=metric, half_space=True,
                                          angle_unit=angle_unit))
    assert value == pytest.approx(library, rel=1e-10)


def test_thomson_problem_known_values():
    """Total Riesz s=1 energy over unordered pairs: tetrahedron (N=4 on S^2) 3.674234614, equilateral
    triangle (N=3 on S^1) sqrt(3); the library's mean over ordered pairs is total * 2 / (N (N-1))."""
    for n, d, total in ((4, 3, 3.674234614), (3, 2, math.sqrt(3.0)), (2, 3, 0.5)):
        pairs = n * (n - 1) // 2
        assert minimum_energy(n, d, s=1.0, eps=1e-12) * pairs == pytest.approx(total, rel=1e-9)
        # with the library's default eps the value moves by O(eps) only
        assert minimum_energy(n, d, s=1.0) * pairs == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("n,d,s,half_space", [(4, 3, 1.0, False), (5, 4, 0.0, False), (3, 3, 2.0, True)])
def test_minimum_is_a_lower_bound_that_descent_reaches(n, d, s, half_space):
    """Random configurations lie above the minimum; projected gradient descent on the library's energy
    from a random start converges to it."""
    target = minimum_energy(n, d, s=s, half_space=half_space)
    gen = torch.Generator().manual_seed(0)
    random_sets = torch.randn(200, n, d, generator=gen, dtype=torch.float64)
    energies = hyperspherical_energy(random_sets, s=s, half_space=half_space)
    assert bool((energies >= target - 1e-12).all())
    w = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.2)
    for _ in range(800):
        opt.zero_grad()
        hyperspherical_energy(w, s=s, half_space=half_space).backward()
        opt.step()
        with torch.no_grad():
            w /= w.norm(dim=1, keepdim=True)
    assert float(hyperspherical_energy(w.detach(), s=s, half_space=half_space)) == pytest.approx(target, rel=1e-6)


def test_unknown_cases_return_none_and_tiny_layers_zero():
    assert minimum_energy(5, 3) is None  # full space: n > d + 1
    assert minimum_energy(4, 3, half_space=True) is None  # half space: n > d
    assert minimum_energy(3, 5, metric="angular") is None  # angular simplex not proven optimal
    assert minimum_energy(2, 5, metric="angular") == pytest.approx(
        float(hyperspherical_energy(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64),
                                    metric="angular")), rel=1e-12)
    with pytest.warns(UserWarning, match="form no pair"):  # no pairs: 0, as hyperspherical_energy
        assert minimum_energy(1, 3) == 0.0 == float(hyperspherical_energy(torch.ones(1, 3)))
    # half space, one neuron: only the pair (w, -w) at chord 2
    assert minimum_energy(1, 3, half_space=True) == pytest.approx((4.0 + 1e-6) ** -1, rel=1e-12)
    assert minimum_energy(1, 3, half_space=True) == pytest.approx(
        float(hyperspherical_energy(torch.ones(1, 3, dtype=torch.float64), half_space=True)), rel=1e-12)


def test_angular_simplex_is_not_always_optimal():
    """Why the angular metric gets no closed form for n >= 3: with s = 0, four points on S^2 as two
    orthogonal antipodal pairs have a lower angular energy than the tetrahedron."""
    tetra = _simplex(4, 3, np.random.default_rng(0))
    cross = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    assert _np_energy(cross, 0.0, "angular") < _np_energy(tetra, 0.0, "angular")


@pytest.mark.parametrize("kwargs,message", [({"s": -1.0}, "s=-1.0 is not supported"),
                                            ({"metric": "cosine"}, "metric='cosine' is not supported"),
                                            ({"n": -1}, "n=-1 is not supported"),
                                            ({"d": 0}, "d=0 is not supported")])
def test_invalid_arguments_name_the_argument(kwargs, message):
    args = {"n": 4, "d": 3, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        minimum_energy(**args)
