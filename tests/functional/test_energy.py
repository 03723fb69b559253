"""hyperspherical_energy against an independent float64 double-loop reference and known optima."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_hyper.functional import hyperspherical_energy, output_energy_from_labels, pairwise_angles
from lightning_hyper.functional.energy import pair_kernel

EPS = 1e-6


def loop_energy(w: np.ndarray, s: float, metric: str, half_space: bool, reduction: str,
                angle_unit: str = "radian", eps: float = EPS) -> float:
    """Literal definition: normalize, (optionally) append negations, sum f over ordered pairs i != j."""
    w = np.asarray(w, dtype=np.float64)
    u = [row / np.linalg.norm(row) for row in w]
    n = len(u)
    pts = u + [-x for x in u] if half_space else u
    total, pairs = 0.0, 0
    for i, a in enumerate(pts):
        for j, b in enumerate(pts):
            if i == j:
                continue
            pairs += 1
            antipodal_copy = half_space and abs(i - j) == n  # the (w, -w) pair: exactly d_max
            if metric == "euclidean":
                r2 = (4.0 if antipodal_copy else float(np.sum((a - b) ** 2))) + eps
                total += -0.5 * math.log(r2) if s == 0 else r2 ** (-s / 2)
            else:
                if antipodal_copy:
                    theta = math.pi
                else:
                    c = min(max(float(np.dot(a, b)), -1 + eps), 1 - eps)
                    theta = math.acos(c)
                if angle_unit == "pi":
                    theta /= math.pi
                total += -math.log(theta) if s == 0 else theta ** (-s)
    return total / pairs if reduction == "mean" else total


VARIANTS = [(s, m, hs, r) for s in (0.0, 0.5, 1.0, 2.0) for m in ("euclidean", "angular")
            for hs in (False, True) for r in ("sum", "mean")]


@pytest.mark.parametrize("s,metric,half_space,reduction", VARIANTS)
def test_matches_double_loop(s, metric, half_space, reduction):
    w = torch.randn(7, 5, dtype=torch.float64) * torch.rand(7, 1, dtype=torch.float64).add(0.1)
    got = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space, reduction=reduction)
    ref = loop_energy(w.numpy(), s, metric, half_space, reduction)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # chunked path (upper-triangle blocks) gives the same value
    chunked = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space, reduction=reduction, chunk_size=3)
    assert chunked.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_angle_unit_pi_matches_reference(s):
    w = torch.randn(5, 4, dtype=torch.float64)
    got = hyperspherical_energy(w, s=s, metric="angular", angle_unit="pi", reduction="sum")
    assert got.item() == pytest.approx(loop_energy(w.numpy(), s, "angular", False, "sum", "pi"), rel=1e-10)


@pytest.mark.parametrize("s,metric,half_space", [(s, m, hs) for s in (0.0, 0.5, 1.0, 2.0)
                                                  for m in ("euclidean", "angular") for hs in (False, True)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck(s, metric, half_space, chunk_size):
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: hyperspherical_energy(x, s=s, metric=metric, half_space=half_space, chunk_size=chunk_size)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))


def test_gradient_matches_autograd_of_loop_formula():
    """The custom backward equals autograd through an explicit pairwise formula."""
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    hyperspherical_energy(w, s=2, reduction="sum", chunk_size=4).backward()
    ours = w.grad.clone()
    w.grad = None
    u = w / w.norm(dim=1, keepdim=True)
    diff = u[:, None, :] - u[None, :, :]
    r2 = (diff ** 2).sum(-1) + EPS
    mask = ~torch.eye(9, dtype=torch.bool)
    (r2[mask] ** -1).sum().backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_neurons_warn_and_give_zero(n):
    w = torch.randn(n, 8, requires_grad=True)
    with pytest.warns(UserWarning, match=f"{n} neuron\\(s\\) form no pair; the energy is defined as 0"):
        e = hyperspherical_energy(w)
    e.backward()
    assert e.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_single_neuron_half_space_is_the_antipodal_pair(s):
    """Half-space MHE of one neuron: the two points w, -w at chord 2 (mean over the 2 ordered pairs)."""
    import warnings

    w = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = hyperspherical_energy(w, s=s, half_space=True)
    r = np.sqrt(4.0 + 1e-6)
    assert e.item() == pytest.approx(-np.log(r) if s == 0 else r ** -s, rel=1e-12)
    e.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("metric", ["euclidean", "angular"])
@pytest.mark.parametrize("half_space", [False, True])
def test_repeated_and_antipodal_neurons_are_finite(metric, half_space):
    base = torch.randn(3, 5)
    w = torch.cat([base, base, -base[:1]]).requires_grad_(True)
    e = hyperspherical_energy(w, s=2, metric=metric, half_space=half_space)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(w.grad).all()
    # the duplicate pair is bounded by eps: r^2 >= eps
    assert e.item() <= 1.0 / EPS


def test_invariances():
    w = torch.randn(10, 6, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    scale = torch.rand(10, 1, dtype=torch.float64) * 100 + 1e-3
    perm = torch.randperm(10)
    for metric in ("euclidean", "angular"):
        for hs in (False, True):
            e = hyperspherical_energy(w, metric=metric, half_space=hs)
            for other in (w * scale, w @ q, w[perm]):
                other_e = hyperspherical_energy(other, metric=metric, half_space=hs)
                assert other_e.item() == pytest.approx(e.item(), rel=1e-10)
    # flipping one neuron's sign: half-space unchanged, full-space changes
    flipped = w.clone()
    flipped[0] *= -1
    assert hyperspherical_energy(flipped, half_space=True).item() == pytest.approx(
        hyperspherical_energy(w, half_space=True).item(), rel=1e-10)
    assert hyperspherical_energy(flipped).item() != pytest.approx(hyperspherical_energy(w).item(), rel=1e-6)


def test_gradient_is_orthogonal_to_each_neuron():
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    hyperspherical_energy(w, s=1).backward()
    radial = (w.grad * w.detach()).sum(dim=1)
    assert radial.abs().max().item() < 1e-10


def test_half_space_equals_concatenation():
    w = torch.randn(6, 4, dtype=torch.float64)
    for metric in ("euclidean",):  # angular: the concatenated pair (w, -w) would be clamped
        for s in (0.0, 1.0, 2.0):
            hs = hyperspherical_energy(w, s=s, metric=metric, half_space=True, reduction="sum")
            cat = hyperspherical_energy(torch.cat([w, -w]), s=s, metric=metric, reduction="sum")
            assert hs.item() == pytest.approx(cat.item(), rel=1e-10)


def test_float32_and_bf16_autocast_return_float32():
    w = torch.randn(16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = hyperspherical_energy(w)
    assert e.dtype == torch.float32
    ref = hyperspherical_energy(w.detach().double())
    assert e.item() == pytest.approx(ref.item(), rel=1e-5)
    e_bf = hyperspherical_energy(w.detach().bfloat16())
    assert e_bf.dtype == torch.float32


# ---------------------------------------------------------------- known optima
# Published Thomson-problem minima (unordered-pair Coulomb energy on S^2), spec mhe.md §4.1.
THOMSON = {2: 0.5, 3: 1.732050808, 4: 3.674234614, 5: 6.474691495, 6: 9.985281374, 7: 14.452977414,
           8: 19.675287861, 9: 25.759986531, 10: 32.716949460, 11: 40.596450510, 12: 49.165253058}


def minimize_energy(n: int, d: int, restarts: int = 4, seed: int = 0, **kw) -> float:
    best = math.inf
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        w = torch.randn(n, d, dtype=torch.float64, generator=gen).requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            e = hyperspherical_energy(w, **kw)
            e.backward()
            return e

        opt.step(closure)
        best = min(best, hyperspherical_energy(w.detach(), **kw).item())
    return best


@pytest.mark.parametrize("n", list(range(2, 13)))
def test_thomson_minima(n):
    e = minimize_energy(n, 3, restarts=4, s=1.0, reduction="sum", eps=1e-12)
    assert e / 2 == pytest.approx(THOMSON[n], rel=1e-3)
    assert e / 2 >= THOMSON[n] * (1 - 1e-6)  # never below the known optimum


@pytest.mark.parametrize("n,d", [(4, 3), (5, 5), (6, 8), (3, 2)])
@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_regular_simplex(n, d, s):
    e = minimize_energy(n, d, restarts=2, s=s, eps=1e-12)
    r2 = 2 * n / (n - 1)
    closed = -0.5 * math.log(r2) if s == 0 else r2 ** (-s / 2)
    assert e == pytest.approx(closed, rel=1e-6, abs=1e-9)


def test_simplex_gram():
    n, d = 5, 6
    w = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = hyperspherical_energy(w, s=2, eps=1e-12)
        e.backward()
        return e

    opt.step(closure)
    u = w.detach() / w.detach().norm(dim=1, keepdim=True)
    g = u @ u.T
    off = g[~torch.eye(n, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (n - 1)), atol=1e-4)


def test_half_space_orthonormal_optimum():
    # N <= D: HS-MHE minimum is any orthonormal set; normalized value (N - 3/4)/(2N - 1) for s=2
    for n, d in [(3, 3), (4, 6)]:
        e = minimize_energy(n, d, restarts=2, s=2.0, half_space=True, eps=0.0 + 1e-12)
        assert e == pytest.approx((n - 0.75) / (2 * n - 1), rel=1e-5)


# ---------------------------------------------------------------- labels (mini-batch output)
def test_output_energy_permutation_equals_full():
    w = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randperm(6)
    full = hyperspherical_energy(w, s=2)
    assert output_energy_from_labels(w, labels, s=2).item() == pytest.approx(full.item(), rel=1e-10)


def test_output_energy_matches_loop_and_gradients():
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 3])
    got = output_energy_from_labels(w, labels, s=1)
    u = w.detach().numpy() / np.linalg.norm(w.detach().numpy(), axis=1, keepdims=True)
    ref = sum((np.sum((u[y] - u[j]) ** 2) + EPS) ** -0.5 for y in labels.tolist() for j in range(5) if j != y)
    assert got.item() == pytest.approx(ref / (3 * 4), rel=1e-10)
    got.backward()
    assert w.grad[2].abs().sum() > 0  # absent class still gets gradient as a column term
    assert torch.autograd.gradcheck(lambda x: output_energy_from_labels(x, labels, s=2), (w,))
    uniq = output_energy_from_labels(w, labels, s=1, unique=True)
    ref_u = sum((np.sum((u[y] - u[j]) ** 2) + EPS) ** -0.5 for y in (0, 3) for j in range(5) if j != y)
    assert uniq.item() == pytest.approx(ref_u / (2 * 4), rel=1e-10)


def test_output_energy_bad_labels():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        output_energy_from_labels(w, torch.tensor([4]))
    with pytest.raises(ValueError, match="labels"):
        output_energy_from_labels(w, torch.tensor([0.5]))


def test_pair_kernel_matches_energy():
    w = torch.randn(5, 4, dtype=torch.float64)
    u = w / w.norm(dim=1, keepdim=True)
    c = (u @ u.T)[~torch.eye(5, dtype=torch.bool)]
    for hs in (False, True):
        assert pair_kernel(c, s=1, half_space=hs).sum().item() + (10 * (4 + EPS) ** -0.5 if hs else 0) == \
            pytest.approx(hyperspherical_energy(w, s=1, half_space=hs, reduction="sum").item(), rel=1e-10)


def test_pairwise_angles():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    ang = pairwise_angles(w, degrees=True)
    assert torch.allclose(ang, torch.tensor([90.0, 180.0, 90.0]), atol=1e-4)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,word", [
    ({"metric": "cosine"}, "metric"), ({"s": -1.0}, "s="), ({"reduction": "max"}, "reduction"),
    ({"angle_unit": "degree"}, "angle_unit"), ({"eps": 0.0}, "eps"), ({"chunk_size": 0}, "chunk_size"),
    ({"zero_norm": "ignore"}, "zero_norm"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        hyperspherical_energy(torch.randn(4, 3), **kwargs)
    assert "accepted" in str(err.value)


def test_bad_tensors():
    with pytest.raises(ValueError, match="neurons"):
        hyperspherical_energy(torch.randn(5))
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hyperspherical_energy(bad)
    zero = torch.randn(4, 3)
    zero[2] = 0
    with pytest.raises(ValueError, match="zero_norm"):
        hyperspherical_energy(zero)
    w = zero.clone().requires_grad_(True)
    e = hyperspherical_energy(w, zero_norm="exclude")
    e.backward()
    assert e.item() == pytest.approx(hyperspherical_energy(zero[[0, 1, 3]]).item())
    assert torch.all(w.grad[2] == 0) and torch.isfinite(w.grad).all()


def test_huge_and_tiny_norms_are_scale_safe():
    w = torch.randn(6, 4)
    e = hyperspherical_energy(w)
    assert hyperspherical_energy(w * 1e30).item() == pytest.approx(e.item(), rel=1e-5)
    assert hyperspherical_energy(w * 1e-4).item() == pytest.approx(e.item(), rel=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("half_space", [False, True])
def test_chunked_memory_is_bounded(half_space):
    """Tall layers (N > d): no tensor larger than one chunk_size² tile or the N×d rows is ever produced (forward and
    backward), and by default (cache-sized tiles on CPU) nothing N×N either; never N x N x d."""
    from lightning_hyper.functional import energy

    n, d, chunk = 600, 16, 64
    w = torch.randn(n, d, requires_grad=True)
    full = hyperspherical_energy(w.detach(), half_space=half_space)
    with LargestTensor() as probe:
        e = hyperspherical_energy(w, chunk_size=chunk, half_space=half_space)
        e.backward()
    assert e.item() == pytest.approx(full.item(), rel=1e-5)
    assert probe.largest <= max(chunk * chunk, n * d)
    with LargestTensor() as probe:
        e = hyperspherical_energy(w, half_space=half_space)
        e.backward()
    assert e.item() == pytest.approx(full.item(), rel=1e-5)
    tile = energy.tile_rows(n, None, 1, w.device)
    assert tile < n and probe.largest <= max(tile * tile, n * d) < n * n


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_batched_energies_equal_per_set_loops(half_space, chunk_size):
    w = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    got = hyperspherical_energy(w, s=1, half_space=half_space, chunk_size=chunk_size)
    assert got.shape == (4,)
    for b in range(4):
        ref = loop_energy(w[b].detach().numpy(), 1.0, "euclidean", half_space, "mean")
        assert got[b].item() == pytest.approx(ref, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: hyperspherical_energy(x, s=2, half_space=half_space, chunk_size=chunk_size), (w,))


def test_batched_sets_exclude_their_own_zero_rows():
    """(B, N, d) with zero_norm="exclude": each set loses only its own zero rows (float64 loops as reference);
    a set left with one row has energy 0 and no warning."""
    import warnings

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    w[1, 2] = 0
    w[2, 1:] = 0  # one row with a direction left: no pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hyperspherical_energy(w, zero_norm="exclude")
    ref = [hyperspherical_energy(w[0]), hyperspherical_energy(w[1][[0, 1, 3, 4]]), 0.0]
    torch.testing.assert_close(got, torch.tensor([float(r) for r in ref], dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="zero_norm"):
        hyperspherical_energy(w)


def test_output_energy_from_labels_excludes_zero_rows():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, dtype=torch.float64, generator=g)
    w[2] = 0
    labels = torch.tensor([0, 2, 3, 5, 5])
    got = output_energy_from_labels(w, labels, zero_norm="exclude")
    keep = [0, 1, 3, 4, 5]  # row 2 and its label leave; labels 3, 5 -> rows 2, 4 of the kept rows
    ref = output_energy_from_labels(w[keep], torch.tensor([0, 2, 4, 4]))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="norm"):
        output_energy_from_labels(w, labels)


def dense_autograd_energy(w: torch.Tensor, s: float, metric: str, half_space: bool) -> torch.Tensor:
    """Independent float64 reference: normalize, full Gram, kernel of every ordered pair, plain autograd."""
    u = w / w.norm(dim=1, keepdim=True)
    c = u @ u.T
    n = w.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)

    def f(cos):
        if metric == "euclidean":
            r2 = (2 - 2 * cos).clamp_min(0) + EPS
            return -0.5 * torch.log(r2) if s == 0 else r2 ** (-s / 2)
        theta = torch.acos(cos.clamp(-1 + EPS, 1 - EPS))
        return -torch.log(theta) if s == 0 else theta ** (-s)

    total = f(c[off]).sum()
    if half_space:
        total = 2 * (total + f(-c[off]).sum())
        d_max = (torch.tensor(4.0 + EPS, dtype=w.dtype) if metric == "euclidean"
                 else torch.tensor(math.pi, dtype=w.dtype))
        const = (-0.5 * torch.log(d_max) if s == 0 else d_max ** (-s / 2)) if metric == "euclidean" else \
            (-torch.log(d_max) if s == 0 else d_max ** (-s))
        return (total + 2 * n * const) / (2 * n * (2 * n - 1))
    return total / (n * (n - 1))


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("metric,half_space", [("euclidean", False), ("euclidean", True), ("angular", False)])
def test_schedules_match_dense_autograd(s, metric, half_space):
    """The in-place kernel on the full Gram (default) and the chunked, recomputing schedule (blocks of 50 rows,
    the last one shorter): value and gradient equal an independent dense float64 autograd computation."""
    n = 461
    w = (torch.randn(n, 6, dtype=torch.float64) * torch.rand(n, 1, dtype=torch.float64).add(0.2)).requires_grad_()
    got = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space)
    (g_got,) = torch.autograd.grad(got, w)
    ref = dense_autograd_energy(w, s, metric, half_space)
    (g_ref,) = torch.autograd.grad(ref, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    chunked = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space, chunk_size=50)
    (g_chunk,) = torch.autograd.grad(chunked, w)
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("s,metric,half_space,reduction", VARIANTS)
def test_gram_tiles_match_double_loop(s, metric, half_space, reduction):
    """Tall layers take the Gram matrix in square tiles on and above the diagonal (a tile above stands for both
    orders of its pairs); 7 rows in tiles of 3 give diagonal tiles, tiles above it and a ragged last tile: value
    against the loop, gradient against gradcheck."""
    w = torch.randn(7, 5, dtype=torch.float64) * torch.rand(7, 1, dtype=torch.float64).add(0.1)
    got = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space, reduction=reduction, chunk_size=3)
    assert got.item() == pytest.approx(loop_energy(w.numpy(), s, metric, half_space, reduction), rel=1e-10,
                                       abs=1e-12)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: hyperspherical_energy(x, s=s, metric=metric, half_space=half_space, reduction=reduction,
                                        chunk_size=3), (w,))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("s,metric,half_space,reduction", VARIANTS)
def test_raw_gram_path_matches_double_loop(monkeypatch, split, s, metric, half_space, reduction):
    """Wide layers (N <= d, every ResNet convolution) take the raw-Gram path: cosines rescaled on N×N, the
    gradient one GEMM ``M x`` with the normalization Jacobian on M's diagonal; from RAW_SPLIT_MIN_ROWS rows
    (lowered to 4 here: uneven halves 3 + 4) the Gram is three half blocks. Value against the loop, gradient
    against gradcheck and against the tall path (chunk_size=2) on the same rows."""
    from lightning_hyper.functional import energy

    monkeypatch.setattr(energy, "RAW_SPLIT_MIN_ROWS", 4 if split else 10**9)
    w = torch.randn(7, 9, dtype=torch.float64) * torch.rand(7, 1, dtype=torch.float64).add(0.1)
    got = hyperspherical_energy(w, s=s, metric=metric, half_space=half_space, reduction=reduction)
    assert got.item() == pytest.approx(loop_energy(w.numpy(), s, metric, half_space, reduction), rel=1e-10,
                                       abs=1e-12)
    w.requires_grad_(True)
    f = lambda x: hyperspherical_energy(x, s=s, metric=metric, half_space=half_space, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))
    (g_raw,) = torch.autograd.grad(f(w), w)
    (g_tall,) = torch.autograd.grad(hyperspherical_energy(w, s=s, metric=metric, half_space=half_space,
                                                          reduction=reduction, chunk_size=2), w)
    torch.testing.assert_close(g_raw, g_tall, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,raw", [((7, 9), True), ((9, 9), True), ((9, 7), False), ((2, 3, 5), True)])
def test_path_selection(monkeypatch, shape, raw):
    """Wide layers (N <= d) take the raw-Gram path, tall ones the normalized-rows path; both give the loop's value
    (batched sets included)."""
    from lightning_hyper.functional import energy

    calls = []
    for name in ("_raw_energy", "_unit_energy"):
        original = getattr(energy, name)
        monkeypatch.setattr(energy, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    w = torch.randn(*shape, dtype=torch.float64)
    got = hyperspherical_energy(w, s=1.0)
    assert calls == ["_raw_energy" if raw else "_unit_energy"]
    sets = w if w.dim() == 3 else w[None]
    ref = [loop_energy(v.numpy(), 1.0, "euclidean", False, "mean") for v in sets]
    np.testing.assert_allclose(got.reshape(-1).numpy(), ref, rtol=1e-10)


def test_raw_path_float32_near_collinear_rows():
    """Two rows 1e-2 apart in float32: the raw-Gram cosines (rescaled after the GEMM) are as accurate as the
    normalized-rows path's (float32 1 - c is what limits both; at 3e-3 apart both are off by up to 4 %): energy
    within 1 % of float64, gradient within 3 %."""
    torch.manual_seed(0)
    base = torch.randn(1, 64, dtype=torch.float64)
    w64 = torch.cat([base, base + 1e-2 * torch.randn(1, 64, dtype=torch.float64),
                     torch.randn(30, 64, dtype=torch.float64)]) * torch.rand(32, 1, dtype=torch.float64).add(0.5)
    w64.requires_grad_(True)
    ref = hyperspherical_energy(w64, s=2)
    (g64,) = torch.autograd.grad(ref, w64)
    for chunk_size in (None, 2):  # raw-Gram path, normalized-rows path
        w32 = w64.detach().float().requires_grad_()
        got = hyperspherical_energy(w32, s=2, chunk_size=chunk_size)
        assert got.item() == pytest.approx(ref.item(), rel=1e-2)
        (g32,) = torch.autograd.grad(got, w32)
        assert (g32.double() - g64).norm() / g64.norm() < 3e-2


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Under ``torch.no_grad()`` a weight that requires grad costs only the forward: the gradient GEMM is skipped
    (a custom autograd forward cannot see the grad mode, so the energy detaches its input), same value."""
    from lightning_hyper.functional import energy

    needs = []
    for name in ("_raw_energy", "_unit_energy"):
        original = getattr(energy, name)
        monkeypatch.setattr(energy, name, lambda x, inv, spec, need, *a, _f=original: needs.append(need)
                            or _f(x, inv, spec, need, *a))
    for shape in ((8, 16), (16, 8)):
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            value = hyperspherical_energy(w)
        assert needs[-1] is False and not value.requires_grad
        assert value.item() == pytest.approx(hyperspherical_energy(w).item(), rel=1e-12)
        assert needs[-1] is True


@pytest.mark.parametrize("shape", [(6, 4), (4, 9)])  # tall (norm pass) and wide (rows checked on the Gram diagonal)
def test_row_checks_on_both_paths(shape):
    """The wide path checks its rows on the Gram diagonal instead of a norm pass; every check still fires with the
    same message, and the recoveries (rescaled huge rows, excluded zero rows, bf16 under autocast) give the values
    of the plain computation."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g)
    e = hyperspherical_energy(w)
    assert e.item() == pytest.approx(loop_energy(w.numpy(), 2.0, "euclidean", False, "mean"), rel=1e-5)
    for factor in (1e30, 1e-4):  # squares overflow float32 / small but above min_norm
        assert hyperspherical_energy(w * factor).item() == pytest.approx(e.item(), rel=1e-5)
    bad = w.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        hyperspherical_energy(bad)
    zero = w.clone()
    zero[2] = 0.0
    with pytest.raises(ValueError, match="min_norm"):
        hyperspherical_energy(zero)
    with pytest.raises(ValueError, match="min_norm"):  # a row of norm ~2e-8 < min_norm = 1e-6, not zero
        hyperspherical_energy(zero.index_fill(0, torch.tensor([2]), 1e-8))
    kept = torch.cat([w[:2], w[3:]])
    assert hyperspherical_energy(zero, zero_norm="exclude").item() == pytest.approx(
        hyperspherical_energy(kept).item(), rel=1e-6)
    leaf = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hyperspherical_energy(leaf)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(e.item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(leaf.grad).all()


def test_a_failing_row_check_costs_one_gram(monkeypatch):
    """A wide layer whose rows fail the Gram-diagonal check (a zero row under zero_norm="exclude", as a dead neuron
    gives every step) goes once to the diagnosis: one failed raw-Gram attempt, then the energy of the kept rows."""
    from lightning_hyper.functional import energy

    grams = []
    original = energy._raw_gram
    monkeypatch.setattr(energy, "_raw_gram", lambda x: grams.append(tuple(x.shape)) or original(x))
    w = torch.randn(5, 12, dtype=torch.float64)
    w[3] = 0.0
    got = hyperspherical_energy(w, zero_norm="exclude")
    assert grams == [(5, 12), (4, 12)]  # the failed check, then the kept rows
    assert got.item() == pytest.approx(loop_energy(w[[0, 1, 2, 4]].numpy(), 2.0, "euclidean", False, "mean"),
                                       rel=1e-10)
