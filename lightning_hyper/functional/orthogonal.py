"""Orthogonalization maps for Orthogonal Over-Parameterized Training (OPT).

Thesis "Deep Representation Learning on Hypersphere" (W. Liu), Chapter 7 and Appendix F.
Every map takes an unconstrained square parameter ``P`` of shape ``(..., d, d)`` (leading
batch dimensions are allowed, used for block-diagonal PE-OPT) and returns an orthogonal
``R`` of the same shape, differentiable in ``P``:

==================  ==============  =========================================================
method              spec name       map
==================  ==============  =========================================================
``gram_schmidt``    ``gs``          Gram-Schmidt on the **rows** of P:  ``R = Q₊(Pᵀ)ᵀ``       (§7.3.3, F.1.1)
``householder``     ``hr``          Householder QR of the **columns** of P: ``R = H₁⋯H_k`` (§7.3.3, F.1.2)
``lowdin``          ``ls``          Löwdin symmetric orthogonalization ``R = P(PᵀP)^{-1/2}`` (§7.3.3, F.1.3)
``cayley``          ``cp``          ``R = (I + S)(I − S)^{-1}``, ``S = triu(P,1) − triu(P,1)ᵀ`` (§7.3.4)
``matrix_exp``      ``exp``         ``R = exp(S)`` with the same skew ``S``                  (§7.3.4)
==================  ==============  =========================================================

``Q₊(A)`` is the Q factor of ``A = QR`` with ``diag(R) ≥ 0``. Also here: ``orthogonality_error``,
the Cayley step on the orthogonal group used by orthogonality-preserving gradient descent
(OGD, §7.3.5), the one ``‖W Wᵀ − I‖`` penalty (:func:`orthogonality_penalty`, called by
OPT's relaxed orthogonality OR §7.3.6, SphereNet / DCNet's :func:`kernel_orthogonality` and DH2L's center
orthogonality), and the helpers of the block variants: S-OPT (a random coordinate subset rotated, §4 of the
spec) and PE-OPT (block-diagonal ``R``, Appendix F.5).

Convention note: ``torch.nn.utils.parametrizations.orthogonal`` builds ``A = tril(X) − tril(X)ᵀ``
and returns ``exp(A)`` or the Cayley retraction ``(I − A/2)^{-1}(I + A/2)``; hence our
``cayley`` on a skew ``S`` equals torch's Cayley on ``A = 2S`` and our ``matrix_exp`` equals
torch's on ``A = S``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hyper.functional.checks import check_choice, check_number

__all__ = [
    "ORTHOGONAL_MAPS",
    "apply_block_rotation",
    "apply_rotation",
    "apply_subset_rotation",
    "block_diagonal",
    "cayley",
    "cayley_apply",
    "embed_subset_rotation",
    "gram_schmidt",
    "householder",
    "lowdin",
    "matrix_exp",
    "ORTHOGONALITY_FORMS",
    "kernel_orthogonality",
    "orthogonality_error",
    "orthogonality_penalty",
    "orthogonalize",
    "relaxed_orthogonality_penalty",
    "resolve_method",
    "sample_subset",
    "skew",
    "stiefel_cayley_step",
]


def _check_square(P: Tensor, name: str = "P") -> None:
    if not isinstance(P, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(P).__name__}")
    if P.dim() < 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"{name} must have shape (..., d, d) (square in the last two dims), got {tuple(P.shape)}")
    if not P.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {P.dtype}")


def _compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces: data-dependent checks must not read a value on the host
    there (``float(t)`` / ``bool(t)`` would break the graph on every forward pass)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else bool(torch._dynamo.is_compiling())


def _check_finite(P: Tensor, name: str = "P") -> None:
    """The orthogonalization maps would silently return NaN for a non-finite ``P``: refuse it.

    Under ``torch.compile`` the check stays in the graph as an asynchronous assert (no graph break)."""
    msg = f"{name} contains NaN or Inf entries; an orthogonal matrix cannot be built from it"
    if _compiling():
        torch._assert_async(torch.isfinite(P).all(), msg)
        return
    if not bool(torch.isfinite(P).all()):
        raise ValueError(msg)


def _eye_like(P: Tensor) -> Tensor:
    return torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)


def _default_eps(P: Tensor) -> float:
    return 1e-12 if P.dtype == torch.float64 else 1e-6


def _sign_no_zero(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) := 1``."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _per_matrix(fn, *mats: Tensor) -> Tensor:
    """Apply an LU-based op (solve, det) matrix by matrix over leading batch dims on CPU.

    Batched LU on CPU (torch 2.14 + oneMKL, more than one thread, n ≳ 200) fails with
    "Parameter 6 was incorrect on entry to SLASWP" and then hangs, so CPU batches are looped."""
    if all(m.dim() == 2 for m in mats) or mats[0].device.type != "cpu":
        return fn(*mats)
    batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    flat = [m.expand(*batch, *m.shape[-2:]).reshape(-1, *m.shape[-2:]) for m in mats]
    out = torch.stack([fn(*parts) for parts in zip(*flat)])
    return out.reshape(*batch, *out.shape[1:])


def _solve(A: Tensor, B: Tensor) -> Tensor:
    return _per_matrix(torch.linalg.solve, A, B)


def _q_plus(A: Tensor) -> Tensor:
    """Q factor of ``A = QR`` with a non-negative diagonal of R (unique for full-rank A).

    The QR backward divides by ``diag(R)``: for a (numerically) rank-deficient ``A`` that requires a
    gradient, a ``ValueError`` is raised instead of returning a NaN/Inf gradient."""
    Q, Rr = torch.linalg.qr(A)
    diag = Rr.diagonal(dim1=-2, dim2=-1)
    if A.requires_grad and torch.is_grad_enabled():
        mag = diag.detach().abs()
        tol = torch.finfo(A.dtype).eps  # exact rank loss only: ill-conditioned P still trains (PointNet S-OPT)
        deficient = (mag <= tol * mag.amax(dim=-1, keepdim=True)).any()
        msg = (f"P (shape {tuple(A.shape)}) is rank-deficient (a diagonal entry of its R factor is <= {tol:.1g} "
               "x the largest): Gram-Schmidt / Householder orthogonalization has no gradient there; "
               "re-initialize P or use method='lowdin', 'cayley' or 'matrix_exp'")
        if _compiling():
            torch._assert_async(deficient.logical_not(), msg)
        elif bool(deficient):
            raise ValueError(msg)
    return Q * _sign_no_zero(diag).detach().unsqueeze(-2)


# --------------------------------------------------------------------------- Gram-Schmidt
_GS_VARIANTS = ("classical", "modified", "iterative")


def gram_schmidt(
    P: Tensor, variant: str = "classical", impl: str = "qr", eps: float | None = None, steps: int = 2
) -> Tensor:
    """Unrolled Gram-Schmidt on the rows of ``P`` (thesis §7.3.3, Algorithm 1, Eq. F.3).

    ``e_i = t_i/‖t_i‖`` with ``t_i = u_i − Σ_{j<i} ⟨u_i, e_j⟩ e_j`` for the rows ``u_i`` of P; the
    result ``R`` has the ``e_i`` as rows (the official code's convention), so ``W = R V``.

    In exact arithmetic every variant equals ``Q₊(Pᵀ)ᵀ`` (QR with positive diagonal). ``impl="qr"``
    (default) computes that closed form with one LAPACK QR, O(d³) and fast; ``impl="loop"``
    runs the literal recursion (``d`` sequential steps; for tests and small ``d``) with
    ``variant`` = ``"classical"`` (CGS), ``"modified"`` (MGS, Eq. F.3) or ``"iterative"``
    (re-orthogonalization repeated ``steps`` times, Algorithm 2). ``eps`` guards ``‖t‖`` for
    rank-deficient P (default 1e-12 in float64, 1e-6 otherwise).
    """
    _check_square(P)
    _check_finite(P)
    if variant not in _GS_VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; accepted values: {list(_GS_VARIANTS)}")
    if impl == "qr":
        return _q_plus(P.mT).mT
    if impl != "loop":
        raise ValueError(f"impl={impl!r} is not supported; accepted values: ['qr', 'loop']")
    eps = _default_eps(P) if eps is None else eps
    rows: list[Tensor] = []
    for i in range(P.shape[-1]):
        u = P[..., i, :]
        if not rows:
            t = u
        elif variant == "modified":
            t = u
            for e in rows:
                t = t - (t * e).sum(-1, keepdim=True) * e
        else:
            E = torch.stack(rows, dim=-2)  # (..., i, d)
            t = u - ((E @ u.unsqueeze(-1)) * E).sum(-2)
            if variant == "iterative":
                for _ in range(max(steps, 1) - 1):
                    t = t - ((E @ t.unsqueeze(-1)) * E).sum(-2)
        rows.append(t / t.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.stack(rows, dim=-2)


# --------------------------------------------------------------------------- Householder
def householder(P: Tensor, full: bool = True, impl: str = "qr", eps: float | None = None) -> Tensor:
    """Householder orthogonalization of the columns of ``P`` (thesis Eq. 7.3, Appendix F.1.2).

    Reflections ``H̃_k = I − β v vᵀ`` map the k-th column of the partly reduced matrix onto
    ``‖x‖e₁`` (the stable Golub-Van Loan ``v₁``, Algorithm 3), ``H_{k}⋯H_1 P = R_upper``, and
    ``R = H_1 H_2 ⋯ H_k``.

    - ``full=True`` (default) applies the complete set of ``d`` reflections (the last one acts on
      the 1×1 block and flips its sign if negative), so ``R = Q₊(P)``; ``det R = sign(det P)``,
      and the map is onto the whole orthogonal group ``O(d)`` (``householder(Q) = Q`` for every
      orthogonal ``Q``), continuous around ``P = I``.
    - ``full=False`` applies the ``d − 1`` reflections of F.1.2 and the official code; then
      ``R = Q₊(P)·diag(1, …, 1, ±1)``, and for generic ``P`` (every reflection non-trivial)
      ``det R = (−1)^{d−1}``.

    ``impl="qr"`` evaluates this closed form with LAPACK (fast; for ``full=False`` it assumes a
    generic P); ``impl="loop"`` runs the literal rank-1-update algorithm (O(d³), ``d`` steps).
    """
    _check_square(P)
    _check_finite(P)
    d = P.shape[-1]
    if impl == "qr":
        Q = _q_plus(P)
        if full:
            return Q
        with torch.no_grad():
            last = _per_matrix(torch.linalg.det, Q).sign() * (-1.0) ** (d - 1)
        scale = torch.ones(P.shape[:-2] + (d,), dtype=P.dtype, device=P.device)
        scale[..., -1] = last
        return Q * scale.unsqueeze(-2)
    if impl != "loop":
        raise ValueError(f"impl={impl!r} is not supported; accepted values: ['qr', 'loop']")
    del eps  # the stable v1 formula needs no guard; kept for a uniform signature
    A = P
    Q = _eye_like(P).expand_as(P)
    idx = torch.arange(d, device=P.device)
    for k in range(d if full else d - 1):
        x1 = A[..., k, k]
        tail = A[..., :, k] * (idx > k).to(P.dtype)  # x_{2:} of the column, embedded at rows k+1..
        sigma2 = (tail * tail).sum(-1)
        trivial = sigma2 == 0
        norm = torch.sqrt(x1 * x1 + sigma2)
        # Golub-Van Loan: v1 = x1 - ‖x‖ computed without cancellation.
        safe_den = torch.where(trivial | (x1 <= 0), torch.ones_like(x1), x1 + norm)
        v1 = torch.where(x1 <= 0, x1 - norm, -sigma2 / safe_den)
        flip = trivial & (x1 < 0) if full else torch.zeros_like(trivial)
        v1_safe = torch.where(trivial, torch.ones_like(v1), v1)
        beta = torch.where(trivial, torch.where(flip, 2.0 * torch.ones_like(v1), torch.zeros_like(v1)),
                           2 * v1_safe**2 / (sigma2 + v1_safe**2).clamp_min(torch.finfo(P.dtype).tiny))
        e_k = (idx == k).to(P.dtype)
        v = e_k + tail / v1_safe.unsqueeze(-1)  # v = [1; x_{2:}/v1] embedded at rows k..
        v = torch.where(trivial.unsqueeze(-1), e_k.expand_as(v), v)
        b = beta.unsqueeze(-1).unsqueeze(-1)
        vc, vr = v.unsqueeze(-1), v.unsqueeze(-2)
        A = A - b * (vc @ (vr @ A))
        Q = Q - b * ((Q @ vc) @ vr)
    return Q


# --------------------------------------------------------------------------- Löwdin
class _PolarFactor(torch.autograd.Function):
    """``R = U Vᵀ`` from ``P = U Σ Vᵀ`` with the well-conditioned polar-factor backward.

    With ``Ĝ = Uᵀ G V`` the gradient is ``U [(Ĝ − Ĝᵀ) / (σ_i + σ_j)] Vᵀ``; it has no
    ``1/(σ_i² − σ_j²)`` terms, so repeated singular values are harmless (spec §3.3).
    """

    @staticmethod
    def forward(ctx, P: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        U, S, Vh = torch.linalg.svd(P, full_matrices=False)
        ctx.save_for_backward(U, S, Vh)
        ctx.eps = eps
        return U @ Vh

    @staticmethod
    def backward(ctx, G: Tensor):  # type: ignore[override]
        U, S, Vh = ctx.saved_tensors
        Gh = U.mT @ G @ Vh.mT
        denom = (S.unsqueeze(-1) + S.unsqueeze(-2)).clamp_min(ctx.eps)
        return U @ ((Gh - Gh.mT) / denom) @ Vh, None


def lowdin(P: Tensor, eps: float | None = None) -> Tensor:
    """Löwdin symmetric orthogonalization ``R = P (PᵀP)^{-1/2} = U Vᵀ`` (Eq. 7.4, F.1.3).

    ``R`` is the orthogonal matrix nearest to ``P`` in Frobenius norm (the "gentlest push");
    ``lowdin(Pᵀ) = lowdin(P)ᵀ``. Computed from the SVD with a custom backward (see
    ``_PolarFactor``); ``eps`` floors ``σ_i + σ_j`` for (near) singular P.
    """
    _check_square(P)
    _check_finite(P)
    return _PolarFactor.apply(P, _default_eps(P) if eps is None else eps)


# --------------------------------------------------------------------------- Cayley / exp
def skew(P: Tensor) -> Tensor:
    """The skew-symmetric matrix ``S = triu(P, 1) − triu(P, 1)ᵀ`` (only the strict upper triangle of P is used)."""
    _check_square(P)
    U = P.triu(1)
    return U - U.mT


def _check_skew_scale(S: Tensor, method: str) -> None:
    """Cayley and the exponential depend on the absolute scale of ``S``: beyond ``max|S| * eps = 1e-3``
    (float32: ~8e3, float64: ~4e12) the result is no longer orthogonal to working precision and the
    exponential's gradient turns NaN, so such a ``P`` is refused instead."""
    if S.numel() == 0:
        return
    limit = 1e-3 / torch.finfo(S.dtype).eps
    if _compiling():  # no host sync under torch.compile: an asynchronous assert in the graph (no graph break)
        big = S.detach().abs().amax()
        torch._assert_async(torch.isfinite(big) & (big <= limit),
                            f"P contains NaN/Inf entries or entries above {limit:.2g} in its skew part: no accurate "
                            f"{method} map in {S.dtype}; keep P moderate (e.g. weight decay), use float64, or a "
                            "scale-invariant method ('lowdin', 'gram_schmidt', 'householder')")
        return
    biggest = float(S.detach().abs().amax())  # one host sync for both checks (NaN propagates through amax)
    if not math.isfinite(biggest):
        raise ValueError("P contains NaN or Inf entries (in its strict upper triangle, the part skew(P) uses); "
                         "an orthogonal matrix cannot be built from it")
    if biggest > limit:
        raise ValueError(f"P has entries up to {biggest:.3g} in its skew part, too large for an accurate {method} "
                         f"map in {S.dtype} (limit {limit:.2g}); keep P moderate (e.g. weight decay), use float64, "
                         "or a scale-invariant method ('lowdin', 'gram_schmidt', 'householder')")


def cayley(P: Tensor) -> Tensor:
    """Cayley parameterization ``R = (I + S)(I − S)^{-1}`` with ``S = skew(P)`` (thesis §7.3.4).

    Computed as ``solve(I − S, I + S)`` (the two factors commute). ``R ∈ SO(d)`` and never has
    eigenvalue −1; ``P = 0`` or ``P = I`` give ``R = I``. torch's ``orthogonal(..., "cayley")``
    on ``A`` equals ``cayley`` on ``S = A/2``.
    """
    S = skew(P)
    _check_skew_scale(S, "cayley")
    eye = _eye_like(P)
    return _solve(eye - S, eye + S)


def cayley_apply(P: Tensor, V: Tensor) -> Tensor:
    """``cayley(P) @ V`` without forming ``R``: since ``I + S = 2I − (I − S)``,
    ``(I − S)^{-1}(I + S) V = 2 (I − S)^{-1} V − V`` — one LU solve with ``n`` right-hand sides
    instead of ``d``, and no ``d × d × n`` matmul (the cheapest exact OPT forward/backward)."""
    S = skew(P)
    _check_skew_scale(S, "cayley")
    if V.shape[-2] != S.shape[-1]:
        raise ValueError(f"R·V dimension mismatch: P has shape {tuple(P.shape)}, V has shape {tuple(V.shape)}")
    return 2 * _solve(_eye_like(P) - S, V) - V


def matrix_exp(P: Tensor) -> Tensor:
    """Exponential map ``R = exp(S)`` with ``S = skew(P)`` (thesis §7.3.4); onto ``SO(d)``."""
    S = skew(P)
    _check_skew_scale(S, "matrix_exp")
    return torch.linalg.matrix_exp(S)


# --------------------------------------------------------------------------- dispatch
ORTHOGONAL_MAPS: dict[str, Callable[..., Tensor]] = {
    "gram_schmidt": gram_schmidt,
    "householder": householder,
    "lowdin": lowdin,
    "cayley": cayley,
    "matrix_exp": matrix_exp,
}
_ALIASES = {"gs": "gram_schmidt", "hr": "householder", "ls": "lowdin", "cp": "cayley", "exp": "matrix_exp"}


def resolve_method(method: str) -> str:
    """Canonical name of an orthogonalization map (accepts the spec's short names gs/hr/ls/cp/exp)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name = _ALIASES.get(method.lower(), method.lower())
    if name not in ORTHOGONAL_MAPS:
        raise ValueError(
            f"method={method!r} is not an orthogonalization map; accepted values: "
            f"{sorted(ORTHOGONAL_MAPS)} (aliases {sorted(_ALIASES)})"
        )
    return name


def orthogonalize(P: Tensor, method: str = "cayley", **kwargs) -> Tensor:
    """``R = orth(P)`` with the map named ``method`` (see the module table); kwargs go to that map."""
    return ORTHOGONAL_MAPS[resolve_method(method)](P, **kwargs)


def orthogonality_error(R: Tensor, norm: str = "max") -> Tensor:
    """``‖RᵀR − I‖`` (``norm="max"``: largest absolute entry; ``"fro"``: Frobenius norm).

    For a batch ``(..., d, d)`` the largest error over the batch is returned (a scalar, no grad).
    """
    _check_square(R, "R")
    if norm not in ("max", "fro"):
        raise ValueError(f"norm={norm!r} is not supported; accepted values: ['max', 'fro']")
    with torch.no_grad():
        D = R.mT @ R - _eye_like(R)
        if norm == "max":
            return D.abs().amax()
        return torch.linalg.matrix_norm(D).amax()


#: Forms of :func:`kernel_orthogonality` (SphereNet §3.2.4 orthonormal, DCNet §4.5 / App. C.1 orthogonal).
ORTHOGONALITY_FORMS: tuple[str, ...] = ("orthonormal", "orthogonal")


def orthogonality_penalty(rows: Tensor, *, off_diagonal: bool = False, squared: bool = True) -> Tensor:
    r"""The one :math:`\|W W^\top - I\|` penalty of the library: every orthogonality regularizer calls it.

    ``rows`` is ``(..., n, d)``: each matrix ``W`` holds ``n`` vectors as its rows and ``G = W W^T`` is their
    Gram matrix (``G_ij = w_i . w_j``). Per matrix:

    * ``off_diagonal=False``: ``||G - I_n||_F^2`` (rows orthonormal);
    * ``off_diagonal=True``: ``||G - diag(G)||_F^2 = sum_{i != j} (w_i . w_j)^2`` (rows orthogonal, any norms);
    * ``squared=False``: the Frobenius norm itself (the square root of the above).

    The values of all matrices are summed (a scalar with autograd). Callers: OPT's relaxed regularizer
    (:func:`relaxed_orthogonality_penalty`, rows = columns of ``R``), SphereNet / DCNet kernel
    orthogonality (:func:`kernel_orthogonality`) and DH2L's center orthogonality
    (:func:`lightning_hyper.functional.hierarchy.hierarchical_penalty`). When ``n > d`` and ``squared`` the
    value comes from the smaller ``d x d`` Gram matrix ``W^T W`` (``||W W^T||_F = ||W^T W||_F``):
    ``||W^T W||_F^2 - 2||W||_F^2 + n`` (orthonormal), ``||W^T W||_F^2 - sum_i ||w_i||^4`` (orthogonal), so the
    memory is ``min(n, d)^2``.
    """
    if not isinstance(rows, Tensor) or rows.dim() < 2:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"orthogonality_penalty: rows={shape} is not supported; accepted values: a (..., n, d) "
                         "tensor whose rows are the vectors")
    n, d = rows.shape[-2:]
    if n <= d or not squared:
        gram = rows @ rows.mT
        eye = torch.eye(n, dtype=torch.bool, device=rows.device)
        dev = gram.masked_fill(eye, 0.0) if off_diagonal else gram - eye.to(gram.dtype)
        if squared:
            return dev.pow(2).sum()
        return torch.linalg.matrix_norm(dev).sum()
    sq = rows.pow(2).sum(-1)  # ||w_i||^2
    gram_sq = (rows.mT @ rows).pow(2).sum((-2, -1))
    if off_diagonal:
        return (gram_sq - sq.pow(2).sum(-1)).sum()
    return (gram_sq - 2.0 * sq.sum(-1) + n).sum()


def relaxed_orthogonality_penalty(R: Tensor, squared: bool = True) -> Tensor:
    """Relaxed orthogonality (OR, thesis Eq. 7.7): ``‖RᵀR − I‖_F²`` (``squared=False``: ``‖RRᵀ − I‖_F``
    as in the official code). Summed over any leading batch (block) dimensions. Computed by
    :func:`orthogonality_penalty`."""
    _check_square(R, "R")
    if squared:
        return orthogonality_penalty(R.mT)  # rows of Rᵀ = columns of R: (Rᵀ)(Rᵀ)ᵀ = RᵀR
    return orthogonality_penalty(R, squared=False)


def kernel_orthogonality(
    neurons: Tensor,
    form: str = "orthonormal",
    normalize: bool = False,
    eps: float = 0.0,
) -> Tensor:
    """Orthogonality penalty of one layer's kernels, ``neurons`` the ``(n, d)`` matrix of flattened kernels.

    With ``W`` the ``(n, d)`` matrix (row ``i`` = kernel ``w_i``; the thesis' ``d x n`` matrix transposed)
    and ``G = W W^T`` (``G_ij = w_i . w_j``), computed by :func:`orthogonality_penalty`:

    * ``"orthonormal"`` (SphereNet, thesis §3.2.4 "orthonormal regularization"): ``||G - I_n||_F^2``;
      on raw weights it also drives every ``||w_i||`` to 1.
    * ``"orthogonal"`` (DCNet, thesis §4.5, App. C.1): ``||G - diag(G)||_F^2 = sum_{i != j} (w_i . w_j)^2``.

    ``normalize=True`` uses ``w_i / sqrt(||w_i||^2 + eps)`` (DCNet reference code; then both forms agree up
    to ``eps``). For ``n > d`` the orthonormal minimum is ``n - d > 0`` (rank of ``G`` is at most ``d``).
    Returns a scalar with autograd.
    """
    check_choice("form", form, ORTHOGONALITY_FORMS, owner="kernel_orthogonality")
    if not isinstance(neurons, Tensor) or neurons.dim() != 2:
        shape = tuple(neurons.shape) if isinstance(neurons, Tensor) else type(neurons).__name__
        raise ValueError(f"neurons: expected an (n, d) matrix of flattened kernels, got {shape}; "
                         "use lightning_hyper.functional.as_neurons(layer)")
    check_number("eps", eps, low=0.0, low_inclusive=True, owner="kernel_orthogonality")
    w = neurons
    if normalize:
        s2 = w.pow(2).sum(1) + eps
        pos = s2 > 0  # all-zero kernels stay zero (value and gradient finite)
        inv = torch.where(pos, torch.rsqrt(torch.where(pos, s2, torch.ones_like(s2))), torch.zeros_like(s2))
        w = w * inv.unsqueeze(1)
    return orthogonality_penalty(w, off_diagonal=form == "orthogonal")


# --------------------------------------------------------------------------- OGD
def stiefel_cayley_step(
    X: Tensor, direction: Tensor, lr: float, solve: str = "exact", iters: int = 2
) -> tuple[Tensor, Tensor]:
    """One Cayley step on the orthogonal group along a descent ``direction`` (thesis §7.3.5, Eqs. 7.5-7.6).

    ``direction`` is ``−∇f(X)`` or its momentum (the thesis prints ``+∇f``, an ascent step; spec §11.2).
    ``Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)``, ``W = Ŵ − Ŵᵀ`` (skew), ``α = min(lr, 1/(‖W‖_F + 1e-8))`` and

    - ``solve="exact"``: ``Y = (I − α/2 W)^{-1}(I + α/2 W) X`` (orthogonal to rounding error);
    - ``solve="fixed_point"``: ``Y₀ = X + α W X`` then ``iters`` times ``Y ← X + α/2 W (X + Y)``
      (Eq. 7.6; error ``O(α^{iters+2})``, so orthogonality slowly drifts).

    Returns ``(Y, W)``; ``W X`` is the direction projected onto the tangent space.
    """
    _check_square(X, "X")
    if direction.shape != X.shape:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, expected X's {tuple(X.shape)}")
    if solve not in ("exact", "fixed_point"):
        raise ValueError(f"solve={solve!r} is not supported; accepted values: ['exact', 'fixed_point']")
    M = direction
    W_hat = M @ X.mT - 0.5 * X @ (X.mT @ M @ X.mT)
    W = W_hat - W_hat.mT
    wnorm = torch.linalg.matrix_norm(W)
    alpha = torch.clamp(1.0 / (wnorm + 1e-8), max=lr).unsqueeze(-1).unsqueeze(-1)
    if solve == "exact":
        eye = _eye_like(X)
        Y = _solve(eye - 0.5 * alpha * W, X + 0.5 * alpha * (W @ X))
    else:
        Y = X + alpha * (W @ X)
        for _ in range(iters):
            Y = X + 0.5 * alpha * (W @ (X + Y))
    return Y, W


# --------------------------------------------------------------------------- R·V and block variants
def apply_rotation(R: Tensor, V: Tensor) -> Tensor:
    """``W = R V`` for neurons stored as the columns of ``V`` (d, n), with a shape check."""
    _check_square(R, "R")
    if V.dim() != 2 or V.shape[0] != R.shape[-1] or R.dim() != 2:
        raise ValueError(
            f"R·V dimension mismatch: R has shape {tuple(R.shape)}, V has shape {tuple(V.shape)}; "
            "expected R (d, d) and V (d, n)"
        )
    return R @ V


def block_diagonal(blocks: Tensor, num_blocks: int | None = None) -> Tensor:
    """PE-OPT block-diagonal rotation ``Diag(R⁽¹⁾, …, R⁽ᵏ⁾)`` (Appendix F.5, Eqs. F.33-F.34).

    ``blocks`` is ``(k, b, b)`` (independent blocks) or ``(b, b)`` repeated ``num_blocks`` times (shared).
    """
    if blocks.dim() == 2:
        if num_blocks is None:
            raise ValueError("num_blocks is required for a single shared (b, b) block")
        blocks = blocks.expand(num_blocks, -1, -1)
    _check_square(blocks, "blocks")
    return torch.block_diag(*blocks.unbind(0))


def apply_block_rotation(R_blocks: Tensor, V: Tensor) -> Tensor:
    """``W = Diag(R⁽¹⁾, …, R⁽ᵏ⁾) V`` without forming the d×d matrix: ``V.view(k, b, n)`` → bmm → ``(d, n)``.

    ``R_blocks`` is ``(k, b, b)`` or a shared ``(b, b)``; ``d = k·b`` must equal ``V.shape[0]``.
    """
    _check_square(R_blocks, "R_blocks")
    if V.dim() != 2:
        raise ValueError(f"V must have shape (d, n), got {tuple(V.shape)}")
    b = R_blocks.shape[-1]
    d, n = V.shape
    if d % b != 0 or (R_blocks.dim() == 3 and R_blocks.shape[0] * b != d):
        raise ValueError(f"R_blocks of shape {tuple(R_blocks.shape)} does not tile V's dimension d={d}")
    return (R_blocks @ V.reshape(d // b, b, n)).reshape(d, n)


def sample_subset(d: int, k: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """S-OPT: a sorted random subset of ``k`` of the ``d`` fan-in coordinates, without replacement."""
    if not 0 < k <= d:
        raise ValueError(f"subset size k={k} must satisfy 0 < k <= d={d}")
    return torch.randperm(d, generator=generator)[:k].sort().values.to(device)


def _check_subset(R_sub: Tensor, indices: Tensor, d: int) -> None:
    _check_square(R_sub, "R_sub")
    if indices.dim() != 1 or indices.numel() != R_sub.shape[-1]:
        raise ValueError(f"indices of shape {tuple(indices.shape)} do not match R_sub of shape {tuple(R_sub.shape)}")
    if indices.numel() and _compiling():
        torch._assert_async(((indices >= 0) & (indices < d)).all(), f"indices must lie in [0, {d})")
    elif indices.numel() and (int(indices.max()) >= d or int(indices.min()) < 0):
        raise ValueError(f"indices must lie in [0, {d})")


def apply_subset_rotation(R_sub: Tensor, V: Tensor, indices: Tensor) -> Tensor:
    """S-OPT effective weights: ``W = V`` except rows ``I``, where ``W[I] = R' V[I]``.

    Equal to ``embed_subset_rotation(R', I, d) @ V`` at cost ``O(d'² n)`` instead of ``O(d² n)``.
    """
    if V.dim() != 2:
        raise ValueError(f"V must have shape (d, n), got {tuple(V.shape)}")
    _check_subset(R_sub, indices, V.shape[0])
    return V.index_copy(0, indices, R_sub @ V.index_select(0, indices))


def embed_subset_rotation(R_sub: Tensor, indices: Tensor, d: int) -> Tensor:
    """The full S-OPT rotation ``I + E_I (R' − I) E_Iᵀ`` (orthogonal whenever ``R'`` is)."""
    _check_subset(R_sub, indices, d)
    R = torch.eye(d, dtype=R_sub.dtype, device=R_sub.device)
    return R.index_put((indices.unsqueeze(1), indices.unsqueeze(0)), R_sub)
