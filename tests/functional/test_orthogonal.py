"""Orthogonalization maps of OPT against independent float64 references (NumPy QR/SVD/eigh, torch's
orthogonal parametrization, closed forms)."""
import math

import numpy as np
import pytest
import torch

from lightning_hyper.functional.orthogonal import (
    ORTHOGONAL_MAPS,
    apply_block_rotation,
    apply_rotation,
    apply_subset_rotation,
    block_diagonal,
    cayley,
    embed_subset_rotation,
    gram_schmidt,
    householder,
    lowdin,
    matrix_exp,
    orthogonality_error,
    orthogonalize,
    relaxed_orthogonality_penalty,
    resolve_method,
    sample_subset,
    skew,
    stiefel_cayley_step,
)

METHODS = sorted(ORTHOGONAL_MAPS)


def _np_q_plus(A: np.ndarray) -> np.ndarray:
    """Reference Q factor with a positive diagonal of R, from NumPy's QR."""
    Q, R = np.linalg.qr(A)
    s = np.where(np.diag(R) >= 0, 1.0, -1.0)
    return Q * s[None, :]


def _np_polar(A: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(A)
    return U @ Vt


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [8, 27, 64])
def test_every_method_is_orthogonal_on_random_inputs(method, d):
    P64 = torch.randn(d, d, dtype=torch.float64)
    R64 = orthogonalize(P64, method)
    assert orthogonality_error(R64) < 1e-10
    assert orthogonality_error(R64.mT) < 1e-10  # R Rᵀ = I as well
    R32 = orthogonalize(P64.float(), method)
    assert R32.dtype == torch.float32
    assert orthogonality_error(R32) < 1e-5
    # batched (PE-OPT blocks): every block orthogonal and equal to the unbatched map
    Pb = torch.randn(3, d, d, dtype=torch.float64)
    Rb = orthogonalize(Pb, method)
    assert orthogonality_error(Rb) < 1e-10
    assert torch.allclose(Rb[1], orthogonalize(Pb[1], method), atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_after_100_sgd_steps(method):
    d, n = 12, 20
    torch.manual_seed(1)
    V = torch.randn(d, n)
    target = torch.linalg.qr(torch.randn(d, d))[0] @ V
    P = torch.randn(d, d, requires_grad=True)
    opt = torch.optim.SGD([P], lr=0.01, momentum=0.9)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((orthogonalize(P, method) @ V - target) ** 2).mean()
        loss.backward()
        assert torch.isfinite(P.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert orthogonality_error(orthogonalize(P.detach(), method)) < 1e-5
    assert orthogonality_error(orthogonalize(P.detach().double(), method)) < 1e-10


# ------------------------------------------------------------------ Cayley / exp vs torch
def _torch_orthogonal(X: torch.Tensor, orthogonal_map: str) -> torch.Tensor:
    """Weight produced by torch's own parametrization from original = X (no trivialization base)."""
    d = X.shape[0]
    lin = torch.nn.Linear(d, d, bias=False).double()
    torch.nn.utils.parametrizations.orthogonal(lin, orthogonal_map=orthogonal_map, use_trivialization=False)
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(X)
    return lin.weight.detach()


def test_cayley_matches_torch_with_factor_two_convention():
    d = 10
    X = torch.randn(d, d, dtype=torch.float64)
    A = X.tril() - X.tril().mT  # torch's skew matrix
    # torch: (I - A/2)^-1 (I + A/2); ours: (I + S)(I - S)^-1 with S = skew(P). Same skew A => S = A/2.
    P = -X.mT / 2
    assert torch.allclose(skew(P), A / 2, atol=1e-15)
    assert torch.allclose(cayley(P), _torch_orthogonal(X, "cayley"), atol=1e-12)
    # with S = A (no factor 2) the two maps differ
    assert not torch.allclose(cayley(-X.mT), _torch_orthogonal(X, "cayley"), atol=1e-3)


def test_matrix_exp_matches_torch_on_same_skew_matrix():
    d = 10
    X = torch.randn(d, d, dtype=torch.float64)
    P = -X.mT  # skew(P) = tril(X) - tril(X)ᵀ
    assert torch.allclose(matrix_exp(P), _torch_orthogonal(X, "matrix_exp"), atol=1e-12)
    # and against a scipy-free series reference: exp(S) = Σ S^k/k!
    S = skew(P) / 8
    ref, term = torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    for k in range(1, 40):
        term = term @ S / k
        ref = ref + term
    assert torch.allclose(matrix_exp(P / 8), ref, atol=1e-12)


def test_cayley_properties():
    d = 9
    P = torch.randn(d, d, dtype=torch.float64, requires_grad=True)
    R = cayley(P)
    S = skew(P.detach())
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(R, (eye + S) @ torch.linalg.inv(eye - S), atol=1e-12)
    assert abs(torch.linalg.det(R).item() - 1.0) < 1e-10
    # the Cayley map inverts exactly
    Rd = R.detach()
    assert torch.allclose((Rd - eye) @ torch.linalg.inv(Rd + eye), S, atol=1e-10)
    assert torch.allclose(cayley(torch.zeros(d, d, dtype=torch.float64)), eye)
    assert torch.allclose(cayley(eye), eye)
    # only the strict upper triangle of P receives gradient
    (R * torch.randn(d, d, dtype=torch.float64)).sum().backward()
    assert P.grad.tril().abs().max() == 0
    assert P.grad.triu(1).abs().max() > 0


# ------------------------------------------------------------------ Gram-Schmidt
@pytest.mark.parametrize("variant", ["classical", "modified", "iterative"])
def test_gram_schmidt_matches_float64_qr(variant):
    d = 16
    P = np.random.default_rng(0).standard_normal((d, d))
    ref = _np_q_plus(P.T).T  # rows of P orthonormalized in order
    Pt = torch.tensor(P)
    assert np.allclose(gram_schmidt(Pt).numpy(), ref, atol=1e-10)
    assert np.allclose(gram_schmidt(Pt, variant=variant, impl="loop").numpy(), ref, atol=1e-10)
    # literal definition: row i of R is in span(rows 1..i of P) and <u_i, e_i> > 0
    R = gram_schmidt(Pt, variant=variant, impl="loop").numpy()
    coeff = P @ R.T  # u_i · e_j
    assert np.allclose(np.triu(coeff, 1), 0, atol=1e-10)
    assert (np.diag(coeff) > 0).all()


def test_gram_schmidt_loop_and_qr_gradients_agree():
    P = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    G = torch.randn(7, 7, dtype=torch.float64)
    (g_qr,) = torch.autograd.grad((gram_schmidt(P) * G).sum(), P)
    (g_loop,) = torch.autograd.grad((gram_schmidt(P, impl="loop") * G).sum(), P)
    assert torch.allclose(g_qr, g_loop, atol=1e-10)


# ------------------------------------------------------------------ Householder
def test_householder_full_set_spans_orthogonal_group():
    d = 6
    dets = set()
    for seed in range(8):
        P = torch.tensor(np.random.default_rng(seed).standard_normal((d, d)))
        R = householder(P)
        det = torch.linalg.det(R).item()
        assert abs(abs(det) - 1) < 1e-10
        assert math.copysign(1, det) == math.copysign(1, torch.linalg.det(P).item())
        dets.add(round(det))
        assert np.allclose(R.numpy(), _np_q_plus(P.numpy()), atol=1e-10)
        assert torch.allclose(householder(P, impl="loop"), R, atol=1e-10)
    assert dets == {-1, 1}
    # onto O(d): every orthogonal matrix (det +1 and det -1) is reached, by P = Q itself
    Q = torch.tensor(_np_q_plus(np.random.default_rng(9).standard_normal((d, d))))
    for target in (Q, Q * torch.tensor([1.0] * (d - 1) + [-1.0], dtype=torch.float64)):
        assert torch.allclose(householder(target), target, atol=1e-10)
        assert torch.allclose(householder(target, impl="loop"), target, atol=1e-10)


@pytest.mark.parametrize("d", [5, 6])
def test_householder_d_minus_1_reflections_convention(d):
    P = torch.randn(d, d, dtype=torch.float64)
    R_loop = householder(P, full=False, impl="loop")
    R = householder(P, full=False)
    assert torch.allclose(R, R_loop, atol=1e-10)
    # = Q₊(P) · diag(1, …, 1, ±1), det = (−1)^{d−1} for generic P
    ratio = torch.tensor(_np_q_plus(P.numpy())).mT @ R
    expected_last = (-1) ** (d - 1) * np.sign(np.linalg.det(P.numpy()))
    assert torch.allclose(ratio, torch.diag(torch.tensor([1.0] * (d - 1) + [expected_last], dtype=torch.float64)),
                          atol=1e-10)
    assert abs(torch.linalg.det(R).item() - (-1) ** (d - 1)) < 1e-10
    # literal algorithm: identity needs no reflection at all
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.equal(householder(eye, full=False, impl="loop"), eye)


def test_householder_is_gram_schmidt_of_the_transpose_and_gradients_agree():
    P = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(householder(P), gram_schmidt(P.mT, impl="loop").mT, atol=1e-10)
    G = torch.randn(8, 8, dtype=torch.float64)
    (g_qr,) = torch.autograd.grad((householder(P) * G).sum(), P)
    (g_loop,) = torch.autograd.grad((householder(P, impl="loop") * G).sum(), P)
    assert torch.allclose(g_qr, g_loop, atol=1e-9)
    # the stable v1 keeps the literal loop finite when a column is already ≈ ‖x‖e1
    Pn = (torch.eye(8, dtype=torch.float64) + 1e-9 * torch.randn(8, 8, dtype=torch.float64)).requires_grad_(True)
    (g,) = torch.autograd.grad((householder(Pn, impl="loop") * G).sum(), Pn)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------ Löwdin
def test_lowdin_is_the_polar_factor_and_nearest_orthogonal_matrix():
    d = 12
    rng = np.random.default_rng(3)
    P = rng.standard_normal((d, d))
    R = lowdin(torch.tensor(P)).numpy()
    assert np.allclose(R, _np_polar(P), atol=1e-10)
    w, U = np.linalg.eigh(P.T @ P)
    assert np.allclose(R, P @ U @ np.diag(w ** -0.5) @ U.T, atol=1e-10)  # P (PᵀP)^{-1/2}
    assert np.allclose(lowdin(torch.tensor(P.T)).numpy(), R.T, atol=1e-10)
    dist = np.linalg.norm(R - P)
    Pt = torch.tensor(P)
    for method in ("gram_schmidt", "householder", "cayley", "matrix_exp"):
        assert dist <= np.linalg.norm(orthogonalize(Pt, method).numpy() - P) + 1e-12
    for seed in range(5):
        Q = _np_q_plus(np.random.default_rng(seed).standard_normal((d, d)))
        assert dist <= np.linalg.norm(Q - P)


def test_lowdin_custom_backward():
    P = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lowdin, (P,))
    G = torch.randn(6, 6, dtype=torch.float64)

    def svd_polar(A):
        U, _, Vh = torch.linalg.svd(A)
        return U @ Vh

    (g_ours,) = torch.autograd.grad((lowdin(P) * G).sum(), P)
    (g_svd,) = torch.autograd.grad((svd_polar(P) * G).sum(), P)
    assert torch.allclose(g_ours, g_svd, atol=1e-9)
    # repeated singular values: SVD autograd breaks down, the polar-factor backward does not
    Q = torch.tensor(_np_q_plus(np.random.default_rng(0).standard_normal((6, 6))))
    Prep = (Q @ torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=torch.float64))).requires_grad_(True)
    (g,) = torch.autograd.grad((lowdin(Prep) * G).sum(), Prep)
    assert torch.isfinite(g).all()
    # finite-difference check of the directional derivative there
    E = torch.randn(6, 6, dtype=torch.float64)
    h = 1e-6
    fd = ((lowdin(Prep.detach() + h * E) - lowdin(Prep.detach() - h * E)) * G).sum() / (2 * h)
    assert abs(fd.item() - (g * E).sum().item()) < 1e-6


# ------------------------------------------------------------------ OGD step
def test_stiefel_cayley_step_descends_and_stays_orthogonal():
    d = 10
    X = torch.tensor(_np_q_plus(np.random.default_rng(0).standard_normal((d, d))))
    G = torch.randn(d, d, dtype=torch.float64)
    Y, W = stiefel_cayley_step(X, -G, lr=0.01)
    assert torch.allclose(W, -W.mT)
    assert (G * (W @ X)).sum() < 0  # descent direction (the thesis' +∇f would ascend)
    assert orthogonality_error(Y) < 1e-12
    # exact step = closed-form Cayley transform of X
    alpha = min(0.01, 1 / (torch.linalg.matrix_norm(W).item() + 1e-8))
    eye = torch.eye(d, dtype=torch.float64)
    ref = torch.linalg.inv(eye - alpha / 2 * W) @ (eye + alpha / 2 * W) @ X
    assert torch.allclose(Y, ref, atol=1e-12)


@pytest.mark.parametrize("iters", [1, 2])
def test_fixed_point_error_order(iters):
    d = 16
    X = torch.tensor(_np_q_plus(np.random.default_rng(1).standard_normal((d, d))))
    G = torch.randn(d, d, dtype=torch.float64)
    errs = []
    lrs = [0.004, 0.002, 0.001]
    for lr in lrs:
        exact, _ = stiefel_cayley_step(X, -G, lr)
        approx, _ = stiefel_cayley_step(X, -G, lr, solve="fixed_point", iters=iters)
        errs.append(torch.linalg.matrix_norm(exact - approx).item())
    slope = np.polyfit(np.log(lrs), np.log(errs), 1)[0]
    assert abs(slope - (iters + 2)) < 0.1


# ------------------------------------------------------------------ block helpers
def test_sopt_subset_rotation_and_energy_preservation():
    d, n, k = 20, 30, 5
    gen = torch.Generator().manual_seed(0)
    idx = sample_subset(d, k, gen)
    assert idx.shape == (k,) and torch.equal(idx, idx.sort().values) and idx.unique().numel() == k
    V = torch.randn(d, n, dtype=torch.float64)
    gram0 = V.mT @ V
    for _ in range(20):  # episodes: rotate a random subset, absorb
        idx = sample_subset(d, k, gen)
        Rs = cayley(torch.randn(k, k, dtype=torch.float64))
        W = apply_subset_rotation(Rs, V, idx)
        full = embed_subset_rotation(Rs, idx, d)
        assert orthogonality_error(full) < 1e-12
        assert torch.allclose(W, full @ V, atol=1e-12)
        rest = torch.ones(d, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(W[rest], V[rest])
        V = W
    assert torch.allclose(V.mT @ V, gram0, atol=1e-10)  # every norm and angle unchanged


def test_block_rotation_helpers():
    k, b, n = 4, 3, 7
    blocks = cayley(torch.randn(k, b, b, dtype=torch.float64))
    V = torch.randn(k * b, n, dtype=torch.float64)
    full = block_diagonal(blocks)
    assert full.shape == (k * b, k * b) and orthogonality_error(full) < 1e-12
    assert torch.allclose(apply_block_rotation(blocks, V), full @ V, atol=1e-12)
    shared = blocks[0]
    assert torch.allclose(apply_block_rotation(shared, V), block_diagonal(shared, k) @ V, atol=1e-12)
    with pytest.raises(ValueError, match="tile"):
        apply_block_rotation(torch.eye(5, dtype=torch.float64), V)


def test_relaxed_penalty_and_error_norms():
    R = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert orthogonality_error(R).item() == pytest.approx(3.0)
    assert orthogonality_error(R, norm="fro").item() == pytest.approx(3.0)
    A = np.random.default_rng(0).standard_normal((5, 5))
    ref_sq = np.sum((A.T @ A - np.eye(5)) ** 2)
    ref_code = np.linalg.norm(A @ A.T - np.eye(5))
    assert relaxed_orthogonality_penalty(torch.tensor(A)).item() == pytest.approx(ref_sq)
    assert relaxed_orthogonality_penalty(torch.tensor(A), squared=False).item() == pytest.approx(ref_code)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="accepted values"):
        orthogonalize(torch.randn(3, 3), "givens")
    assert resolve_method("cp") == "cayley" and resolve_method("GS") == "gram_schmidt"
    with pytest.raises(ValueError, match=r"\(\.\.\., d, d\)"):
        cayley(torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        cayley(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="variant"):
        gram_schmidt(torch.randn(3, 3), variant="fast")
    with pytest.raises(ValueError, match="impl"):
        householder(torch.randn(3, 3), impl="geqrf")
    with pytest.raises(ValueError, match="norm"):
        orthogonality_error(torch.eye(3), norm="l1")
    with pytest.raises(ValueError, match="dimension mismatch"):
        apply_rotation(torch.eye(4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="0 < k <= d"):
        sample_subset(4, 5)
    with pytest.raises(ValueError, match="solve"):
        stiefel_cayley_step(torch.eye(3), torch.zeros(3, 3), 0.1, solve="approx")


def test_batched_lu_based_maps_on_large_blocks():
    # regression: batched LU on CPU (torch 2.14 + MKL, 2 threads) hangs for n >= ~200; maps loop instead
    P = torch.randn(2, 256, 256)
    R = cayley(P)
    assert orthogonality_error(R) < 1e-5
    assert torch.allclose(R[1], cayley(P[1]), atol=1e-6)
    Rh = householder(P, full=False)
    assert torch.allclose(torch.linalg.det(Rh[0].double()), torch.tensor(-1.0, dtype=torch.float64), atol=1e-3)


def test_cayley_apply_equals_rotation_times_v():
    P = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 7, 4, dtype=torch.float64)
    from lightning_hyper.functional.orthogonal import cayley_apply

    assert torch.allclose(cayley_apply(P, V), cayley(P) @ V, atol=1e-12)
    G = torch.randn(2, 7, 4, dtype=torch.float64)
    (g1,) = torch.autograd.grad((cayley_apply(P, V) * G).sum(), P)
    (g2,) = torch.autograd.grad(((cayley(P) @ V) * G).sum(), P)
    assert torch.allclose(g1, g2, atol=1e-10)
    with pytest.raises(ValueError, match="dimension mismatch"):
        cayley_apply(P[0], torch.randn(5, 3, dtype=torch.float64))


# --------------------------------------------------------------------------- the one ||W Wᵀ − I|| penalty
def _gram_reference(rows: np.ndarray, off_diagonal: bool) -> float:
    """sum_{i,j} (w_i . w_j - [i == j])^2 by loops (off_diagonal: pairs i != j only), float64."""
    n = rows.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if off_diagonal and i == j:
                continue
            total += (float(rows[i] @ rows[j]) - (1.0 if i == j else 0.0)) ** 2
    return total


@pytest.mark.parametrize("n,d", [(3, 5), (5, 5), (7, 3)])
def test_orthogonality_penalties_share_one_float64_reference(n, d):
    """OPT's relaxed regularizer, SphereNet / DCNet kernel orthogonality and DH2L's center orthogonality all
    compute the same ||W Wᵀ − I|| as an independent loop reference."""
    from lightning_hyper.functional.hierarchy import Hierarchy, HierarchyGeometry, hierarchical_penalty
    from lightning_hyper.functional.orthogonal import kernel_orthogonality, orthogonality_penalty

    g = torch.Generator().manual_seed(n * 10 + d)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    ref = _gram_reference(W.numpy(), off_diagonal=False)
    ref_off = _gram_reference(W.numpy(), off_diagonal=True)
    assert orthogonality_penalty(W).item() == pytest.approx(ref, rel=1e-12)
    assert orthogonality_penalty(W, off_diagonal=True).item() == pytest.approx(ref_off, rel=1e-12, abs=1e-14)
    assert kernel_orthogonality(W, "orthonormal").item() == pytest.approx(ref, rel=1e-12)
    assert kernel_orthogonality(W, "orthogonal").item() == pytest.approx(ref_off, rel=1e-12, abs=1e-14)
    # relaxed OR on a square R: ||RᵀR − I||_F² (rows of Rᵀ) and ||RRᵀ − I||_F (rows of R)
    R = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    assert relaxed_orthogonality_penalty(R).item() == pytest.approx(_gram_reference(R.T.numpy(), False), rel=1e-12)
    assert relaxed_orthogonality_penalty(R, squared=False).item() == pytest.approx(
        math.sqrt(_gram_reference(R.numpy(), False)), rel=1e-12)
    # DH2L: lambda_o ||ΔC ΔCᵀ − I||_F over the n groups' center offsets (every group present)
    h = Hierarchy([list(range(n)) * 2])  # n groups, two classes each
    geo = HierarchyGeometry(h, torch.randn(2 * n, d, generator=g, dtype=torch.float64), [W], [W], None)
    terms = hierarchical_penalty(geo, None, "AM", weight=0.0, center_orthogonality=1.0)
    assert terms["orthogonality"].item() == pytest.approx(math.sqrt(ref), rel=1e-12)
