"""The operator core of SphereNet (thesis Ch. 3) and decoupled networks / DCNet (thesis Ch. 4).

The one home of the angle functions ``g``, the magnitude functions ``h``, the patch / filter norms and the
SphereConv / decoupled operators. The GA-Softmax target ``psi`` lives with every other margin in
:mod:`lightning_hyper.functional.margin` (:func:`~lightning_hyper.functional.margin.ga_psi`); the kernel
orthogonality penalty with every other ``||W W^T - I||`` penalty in :mod:`lightning_hyper.functional.orthogonal`
(:func:`~lightning_hyper.functional.orthogonal.kernel_orthogonality`).

A convolution computes, per output position, ``w^T x = ||w|| ||x|| cos(theta)`` with ``w`` a
(flattened) filter and ``x`` the (flattened, zero-padded) input patch. The hyperspherical and
decoupled operators replace it by ``h(||w||, ||x||) * g(theta)``:

* SphereConv (eq. 3.1): ``g(theta)`` only (``h = 1``), ``g`` an *angle function*.
* Decoupled operators (eq. 4.3): a *magnitude function* ``h`` (sphere, ball, tanh, linear, seg,
  log, mix; eq. 4.4-4.10) times an *angular activation* ``g`` (linear, cosine, sigmoid,
  square-cosine; eq. 4.11-4.14).

Everything is computed without ``unfold``: the main convolution uses the normalized filters
``w / ||w||`` and the patch norms come from one extra convolution of ``x**2`` (summed over the
input channels of each group) with an all-ones kernel, with exactly the same stride, padding
and dilation as the main convolution (the reference code hard-codes stride 1 for it, a bug for
strided layers). Both norms get ``eps`` inside the square root (``sqrt(||.||^2 + eps)``), so an
all-zero patch or filter gives ``cos = 0`` and finite gradients.

Speed (the operators are memory-bound once the convolutions are done, and on CPU a fresh full-size tensor
costs several in-place passes): the elementwise work after the convolutions runs in a few custom autograd
Functions with hand-written backwards that recompute cheap quantities and reuse one or two full-size buffers
(``_ConvAndPatchSums``: both convolutions of a stride-1 layer, the patch-norm term added in place into the input
gradient; ``_CosineFromParts``; ``_AsinActivation``: linear / sigmoid ``g``; ``_DecoupledProduct``: ``h * g`` of
the unweighted decoupled operators). Each is tested against the plain autograd composition of the same formula;
``decoupled_conv(..., fast=False)`` keeps that composition.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_hyper.functional.checks import argument_error, check_choice, check_number

__all__ = [
    "ANGLE_FNS",
    "ANGULAR_ACTIVATIONS",
    "MAGNITUDE_FNS",
    "RADIUS_MAGNITUDES",
    "WEIGHTED_MODES",
    "safe_acos",
    "angle_linear",
    "angle_sigmoid",
    "angle_function",
    "angular_activation",
    "magnitude_function",
    "filter_norms",
    "patch_norms",
    "normalized_conv",
    "sphere_conv",
    "sphere_linear",
    "decoupled_conv",
    "decoupled_linear",
    "decoupled_combine",
    "linear_parts",
    "add_channel_bias",
    "check_weighted",
]

#: SphereConv angle functions (thesis §3.2.1; "learnable" = sigmoid with a trained k; "none" = plain conv).
ANGLE_FNS: tuple[str, ...] = ("linear", "cosine", "sigmoid", "learnable", "none")
#: DCNet angular activations (eq. 4.11-4.14, "relu_cos" = max(0, cos) of the §4.5 remark).
ANGULAR_ACTIVATIONS: tuple[str, ...] = ("linear", "cosine", "sigmoid", "learnable", "sqcos", "relu_cos")
#: DCNet magnitude functions (eq. 4.4-4.10).
MAGNITUDE_FNS: tuple[str, ...] = ("sphere", "ball", "tanh", "linear", "seg", "log", "mix")
#: Magnitude functions with a (learnable) operator radius rho.
RADIUS_MAGNITUDES: tuple[str, ...] = ("ball", "tanh", "seg")
#: Weighted decoupled operators (§4.3.3): put ||w|| back into h.
WEIGHTED_MODES: tuple[str, ...] = ("none", "linear", "nonlinear_joint", "nonlinear_separate")

_HALF_PI = math.pi / 2


def _check_positive(name: str, value: float | Tensor | None, allow_zero: bool = False) -> None:
    """A number ``> 0`` (``>= 0`` with ``allow_zero``); tensors (learnable values) and ``None`` pass."""
    if value is None or isinstance(value, Tensor):
        return
    check_number(name, value, low=0.0, low_inclusive=allow_zero)


# ----------------------------------------------------------------------------------------------
# arccos with a bounded gradient
# ----------------------------------------------------------------------------------------------
class _SafeAcos(torch.autograd.Function):
    """``acos(clamp(c, -1+delta, 1-delta))`` with derivative ``-1/sqrt(max(1-c^2, cap))``.

    The true derivative ``-1/sqrt(1-c^2)`` is infinite at ``c = +-1``; capping it (instead of
    zeroing it like a plain clamp would) keeps a useful gradient for nearly aligned vectors.
    """

    @staticmethod
    def forward(ctx, c: Tensor, delta: float, cap: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        ctx.cap = cap
        return torch.acos(c.clamp(-1.0 + delta, 1.0 - delta))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return -grad * torch.rsqrt((1.0 - c * c).clamp_min(ctx.cap)), None, None


def safe_acos(c: Tensor, eps: float = 1e-6, grad_cap: float = 1e-6) -> Tensor:
    """``theta = arccos(c)`` that never returns NaN and has a finite gradient everywhere.

    Forward clamps to ``[-1+eps, 1-eps]`` (``eps = 1e-6`` is representable below 1 in float32);
    backward uses ``-1/sqrt(max(1 - c^2, grad_cap))`` (factor capped at ``grad_cap**-0.5``).
    Spherenet spec §1.4.
    """
    return _SafeAcos.apply(c, float(eps), float(grad_cap))


# ----------------------------------------------------------------------------------------------
# angle functions g(theta)
# ----------------------------------------------------------------------------------------------
def angle_linear(theta: Tensor) -> Tensor:
    """Linear angle function ``g(theta) = 1 - 2 theta / pi`` (eq. 3.2 / 4.11), range [-1, 1]."""
    return 1.0 - theta * (2.0 / math.pi)


def angle_sigmoid(theta: Tensor, k: float | Tensor) -> Tensor:
    """Sigmoid angle function (eq. 3.4 / 4.13) in its overflow-free closed form.

    ``g(theta) = tanh((pi/2 - theta) / (2k)) / tanh(pi / (4k))``, algebraically identical to
    ``[(1+e^{-pi/2k})/(1-e^{-pi/2k})] * [(1-e^{theta/k-pi/2k})/(1+e^{theta/k-pi/2k})]``; ``k > 0``
    sets the curvature (k -> 0: step function, k -> inf: linear). ``k`` may be a tensor
    broadcastable to ``theta`` (learnable k, one per filter).
    """
    if not isinstance(k, Tensor):
        _check_positive("k", k)
        return torch.tanh((_HALF_PI - theta) / (2.0 * k)) / math.tanh(math.pi / (4.0 * k))
    return torch.tanh((_HALF_PI - theta) / (2.0 * k)) / torch.tanh(math.pi / (4.0 * k))


def angle_function(theta: Tensor, name: str, k: float | Tensor | None = None) -> Tensor:
    """Evaluate an angular function ``g`` on angles ``theta`` in [0, pi] by name.

    Names: ``linear``, ``cosine``, ``sigmoid`` / ``learnable`` (needs ``k``), ``sqcos``
    (``cos|cos|``), ``relu_cos`` (``max(0, cos)``).
    """
    check_choice("angle function", name, ANGULAR_ACTIVATIONS)
    if name == "linear":
        return angle_linear(theta)
    if name in ("sigmoid", "learnable"):
        if k is None:
            raise ValueError(f"angle function {name!r} needs k > 0")
        return angle_sigmoid(theta, k)
    return _activation_from_cos(torch.cos(theta), name)


def _activation_from_cos(c: Tensor, name: str) -> Tensor:
    if name == "cosine":
        return c
    if name == "sqcos":
        return c * c.abs()
    if name == "relu_cos":
        return c.clamp_min(0.0)
    raise AssertionError(name)  # pragma: no cover


def angular_activation(
    cos: Tensor, name: str, k: float | Tensor | None = None, acos_eps: float = 1e-6
) -> Tensor:
    """``g(theta)`` from ``cos(theta)``; arccos is taken only for ``linear``/``sigmoid``/``learnable``.

    cosine (eq. 3.3 / 4.12): ``cos``; square cosine (eq. 4.14): ``sign(cos) cos^2``; linear / sigmoid
    go through :func:`safe_acos`.
    """
    check_choice("angular", name, ANGULAR_ACTIVATIONS)
    if name in ("cosine", "sqcos", "relu_cos"):
        return _activation_from_cos(cos, name)
    theta = safe_acos(cos, acos_eps)
    if name == "linear":
        return angle_linear(theta)
    if k is None:
        raise ValueError(f"angular={name!r} needs k > 0")
    return angle_sigmoid(theta, k)


# ----------------------------------------------------------------------------------------------
# magnitude functions h(||x||)
# ----------------------------------------------------------------------------------------------
def _recip(v: Tensor | float) -> Tensor | float:
    """``1 / v`` of a small tensor (radius, norms) or a number: multiplying full-size tensors by it
    is cheaper than dividing them (and so is its backward)."""
    return v.reciprocal() if isinstance(v, Tensor) else 1.0 / v


def _scaled(alpha: float, t: Tensor) -> Tensor:
    return t if alpha == 1.0 else alpha * t


def magnitude_function(
    xn: Tensor,
    name: str,
    alpha: float = 1.0,
    rho: float | Tensor | None = None,
    beta: float | None = None,
) -> Tensor | float:
    """Magnitude function ``h(||x||)`` of a standard decoupled operator (thesis §4.3.1).

    ======== ================================================ =======
    name     h(n)                                             eq.
    ======== ================================================ =======
    sphere   alpha  (returned as the float ``alpha``)         4.4
    ball     alpha * min(n, rho) / rho                        4.5
    tanh     alpha * tanh(n / rho)                            4.6
    linear   alpha * n                                        4.7
    seg      alpha*n if n <= rho else beta*n + (alpha-beta)*rho 4.8
    log      alpha * log(1 + n)                               4.9
    mix      alpha * n + beta * log(1 + n)                    4.10
    ======== ================================================ =======

    ``rho`` (ball, tanh, seg) is the operator radius, already multiplied by the running patch-norm
    mean when radius normalization is on (App. C.2); ``beta`` is SegConv's second slope or
    MixConv's log weight.
    """
    check_choice("magnitude", name, MAGNITUDE_FNS)
    if name == "sphere":
        return alpha
    if name == "linear":
        return _scaled(alpha, xn)
    if name == "log":
        return _scaled(alpha, torch.log1p(xn))
    if name == "mix":
        if beta is None:
            raise ValueError("magnitude='mix' needs beta (the log weight)")
        return alpha * xn + beta * torch.log1p(xn)
    if rho is None:
        raise ValueError(f"magnitude={name!r} needs the operator radius rho")
    if name == "ball":
        return _scaled(alpha, (xn * _recip(rho)).clamp_max(1.0))  # = alpha min(n, rho)/rho; no rho-grad outside
    if name == "tanh":
        return _scaled(alpha, torch.tanh(xn * _recip(rho)))
    # seg
    if beta is None:
        raise ValueError("magnitude='seg' needs beta (the slope above the radius)")
    return torch.where(xn <= rho, alpha * xn, beta * xn + (alpha - beta) * rho)


# ----------------------------------------------------------------------------------------------
# norms and the normalized convolution
# ----------------------------------------------------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_fn(weight: Tensor):
    nd = weight.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"weight must be a Conv1d/2d/3d kernel (3-5 dims), got shape {tuple(weight.shape)}")
    return _CONV[nd]


def filter_norms(weight: Tensor, eps: float = 1e-4) -> Tensor:
    """``sqrt(||w_i||^2 + eps)`` for every output unit (row) of a Linear/ConvNd weight -> ``(C_out,)``."""
    return torch.sqrt(weight.flatten(1).pow(2).sum(1) + eps)


def patch_norms(
    x: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    eps: float = 1e-4,
) -> Tensor:
    """Norms ``sqrt(||x_patch||^2 + eps)`` of every input patch of a convolution -> ``(N, groups, *out)``.

    Computed as a convolution of ``x**2`` with an all-ones kernel (never ``unfold``): the squares
    are first summed over the input channels of each group (``(N, groups, *spatial)``), then
    convolved with ``ones(groups, 1, *kernel_size)`` using the *same* stride, padding (zero padding
    contributes zeros, as in the main conv) and dilation as the main convolution. Cost:
    ``groups/C_out`` of the main conv's FLOPs or less. Non-zero padding modes must be applied to
    ``x`` beforehand (with ``padding=0`` here and in the main conv).
    """
    nd = x.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"x must be (N, C, *spatial) with 1-3 spatial dims, got shape {tuple(x.shape)}")
    c_in = x.shape[1]
    if groups < 1 or c_in % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {c_in} input channels")
    ks = (kernel_size,) * nd if isinstance(kernel_size, int) else tuple(kernel_size)
    back_pad = _transposed_padding(nd, ks, stride, padding, dilation)
    if back_pad is not None:
        ssq = _PatchSquareSums.apply(x, ks, padding, dilation, groups, back_pad)
    else:
        sq = _SquareSum.apply(x, groups)
        ones = torch.ones((groups, 1, *ks), dtype=sq.dtype, device=sq.device)
        ssq = _CONV[nd](sq, ones, None, stride, padding, dilation, groups)
    # sums of non-negative numbers; clamp guards against tiny negatives from fast conv algorithms
    return torch.sqrt(ssq.clamp_min(0.0) + eps)


class _SquareSum(torch.autograd.Function):
    """``(x * x)`` summed over the input channels of each of ``groups`` groups: ``(N, C, *S) -> (N, G, *S)``.

    Its backward is one full-size pass, ``x * 2 g`` (``g`` broadcast over the channels of its group), where
    autograd's ``x * x`` takes three (``g x`` for each factor, then their sum). Differentiable twice (the
    backward is built from differentiable ops).
    """

    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.groups = groups
        return (x * x).unflatten(1, (groups, x.shape[1] // groups)).sum(2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        g2 = grad * 2.0  # (N, G, *S): small
        if ctx.groups == 1:
            return x * g2, None
        xg = x.unflatten(1, (ctx.groups, x.shape[1] // ctx.groups))
        return (xg * g2.unsqueeze(2)).flatten(1, 2), None


def _tuple(v: Sequence[int] | int, nd: int) -> tuple[int, ...]:
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _transposed_padding(nd: int, ks: tuple[int, ...], stride, padding, dilation) -> tuple[int, ...] | None:
    """For a stride-1 convolution with numeric padding ``p``, the padding ``d (k - 1) - p`` that makes the
    same all-ones convolution its transpose (the kernel is symmetric); ``None`` where that does not apply
    (strides, ``"same"`` / ``"valid"``, padding beyond the kernel)."""
    if isinstance(padding, str) or any(s != 1 for s in _tuple(stride, nd)):
        return None
    back = tuple(d * (k - 1) - p for k, p, d in zip(ks, _tuple(padding, nd), _tuple(dilation, nd)))
    return back if all(b >= 0 for b in back) else None


class _PatchSquareSums(torch.autograd.Function):
    """Stride-1 ``conv(sum_group(x * x), ones)``: the squared patch norms ``(N, G, *out)``.

    The backward of the all-ones convolution is the same convolution with the transposed padding
    (:func:`_transposed_padding`), a forward convolution that is many times cheaper than the generic
    convolution backward on a single channel (6 ms -> 0.3 ms at batch 16, 56x56 on one CPU thread); then
    ``2 x g`` in one full-size pass. Differentiable twice (the backward is built from differentiable ops).
    """

    @staticmethod
    def forward(ctx, x: Tensor, ks: tuple[int, ...], padding, dilation, groups: int,  # type: ignore[override]
                back_pad: tuple[int, ...]) -> Tensor:
        nd = x.dim() - 2
        sq = (x * x).unflatten(1, (groups, x.shape[1] // groups)).sum(2)
        ones = torch.ones((groups, 1, *ks), dtype=sq.dtype, device=sq.device)
        ctx.save_for_backward(x)
        ctx.conf = (nd, dilation, groups, back_pad, ks)
        return _CONV[nd](sq, ones, None, 1, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        nd, dilation, groups, back_pad, ks = ctx.conf
        ones = torch.ones((groups, 1, *ks), dtype=grad.dtype, device=grad.device)
        g2 = _CONV[nd](grad * 2.0, ones, None, 1, back_pad, dilation, groups)  # (N, G, *spatial): small
        if groups == 1:
            return x * g2, None, None, None, None, None
        xg = x.unflatten(1, (groups, x.shape[1] // groups))
        return (xg * g2.unsqueeze(2)).flatten(1, 2), None, None, None, None, None


class _ConvAndPatchSums(torch.autograd.Function):
    """Stride-1 ``(conv(x, w_hat), conv(sum_group(x * x), ones))``: the main convolution and the squared patch
    norms of :func:`normalized_conv` in one node.

    Same kernels as the two separate convolutions (``torch.ops.aten.convolution_backward`` for the main one,
    :class:`_PatchSquareSums`' transposed all-ones convolution for the patch sums), but the patch-norm term of
    ``dL/dx`` is added in place into the main convolution's input gradient (``addcmul_``) instead of being a
    second full-size tensor that autograd then adds. Differentiable twice (differentiable ops only).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_hat: Tensor, padding: tuple[int, ...], dilation: tuple[int, ...],  # type: ignore[override]
                groups: int, back_pad: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        nd = x.dim() - 2
        ks = tuple(w_hat.shape[2:])
        inner = _CONV[nd](x, w_hat, None, 1, padding, dilation, groups)
        sq = (x * x).unflatten(1, (groups, x.shape[1] // groups)).sum(2)
        ones = torch.ones((groups, 1, *ks), dtype=sq.dtype, device=sq.device)
        ssq = _CONV[nd](sq, ones, None, 1, padding, dilation, groups)
        ctx.save_for_backward(x, w_hat)
        ctx.conf = (nd, padding, dilation, groups, back_pad)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero-filled conv backward
        return inner, ssq

    @staticmethod
    def backward(ctx, grad_inner: Tensor | None, grad_ssq: Tensor | None):  # type: ignore[override]
        x, w_hat = ctx.saved_tensors
        nd, padding, dilation, groups, back_pad = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        if grad_inner is not None and (need_x or need_w):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_inner, x, w_hat, None, [1] * nd, list(padding), list(dilation), False, [0] * nd, groups,
                [need_x, need_w, False],
            )
        if grad_ssq is not None and need_x:
            ones = torch.ones((groups, 1, *w_hat.shape[2:]), dtype=grad_ssq.dtype, device=grad_ssq.device)
            g2 = _CONV[nd](grad_ssq * 2.0, ones, None, 1, back_pad, dilation, groups)  # (N, G, *spatial): small
            if groups == 1:
                grad_x = x * g2 if grad_x is None else grad_x.addcmul_(x, g2)
            else:
                xg = x.unflatten(1, (groups, x.shape[1] // groups))
                g2 = g2.unsqueeze(2)
                if grad_x is None:
                    grad_x = (xg * g2).flatten(1, 2)
                else:
                    grad_x.unflatten(1, (groups, x.shape[1] // groups)).addcmul_(xg, g2)
        return grad_x, grad_w, None, None, None, None


def _per_channel(t: Tensor, c_out: int) -> Tensor:
    """Broadcast a per-group patch quantity ``(N, G, *S)`` to ``(N, C_out, *S)`` (or keep ``G = 1``)."""
    g = t.shape[1]
    if g == 1:
        return t
    return t.repeat_interleave(c_out // g, dim=1)


def _channel_view(v: Tensor, nd: int) -> Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)`` for broadcasting against ``(N, C, *spatial)``."""
    return v.reshape(1, -1, *([1] * nd))


def normalized_conv(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    eps: float = 1e-4,
    need_patch_norms: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Shared first step of every operator: ``(inner, xn, wn)``.

    ``inner = conv(x, w / wn) = ||x|| cos(theta)`` (``(N, C_out, *out)``), ``xn`` the patch norms
    ``(N, groups, *out)`` (see :func:`patch_norms`; ``None`` if not needed) and ``wn`` the filter
    norms ``(C_out,)``, both with ``eps`` inside the square root.
    """
    conv = _conv_fn(weight)
    wn = filter_norms(weight, eps)
    w_hat = weight / wn.reshape(-1, *([1] * (weight.dim() - 1)))
    nd = weight.dim() - 2
    ks = tuple(weight.shape[2:])
    if (need_patch_norms and x.dim() == weight.dim() and not _autocast_enabled(x)
            and x.shape[1] == weight.shape[1] * groups and weight.shape[0] % groups == 0
            and _transposed_padding(nd, ks, stride, padding, dilation) is not None):
        # stride 1 without autocast: one node for both convolutions, the patch-norm gradient added in place
        back_pad = _transposed_padding(nd, ks, stride, padding, dilation)
        inner, ssq = _ConvAndPatchSums.apply(x, w_hat, _tuple(padding, nd), _tuple(dilation, nd), groups, back_pad)
        return inner, torch.sqrt(ssq.clamp_min(0.0) + eps), wn
    inner = conv(x, w_hat, None, stride, padding, dilation, groups)
    xn = None
    if need_patch_norms:
        if _autocast_enabled(x):  # sums of squares in half precision lose the |cos| <= 1 bound: use float32
            with torch.autocast(device_type=x.device.type, enabled=False):
                xn = patch_norms(x.float(), weight.shape[2:], stride, padding, dilation, groups, eps)
        else:
            xn = patch_norms(x, weight.shape[2:], stride, padding, dilation, groups, eps)
    return inner, xn, wn


def _autocast_enabled(t: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # older torch: no device_type argument
        return torch.is_autocast_enabled()


_HALF = (torch.float16, torch.bfloat16)


def _float32_block(*ts: Tensor | None) -> list[Tensor | None]:
    """Upcast half-precision tensors to float32 (norms / cos / g are computed in >= float32)."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]


class _AsinActivation(torch.autograd.Function):
    """Fused ``g`` for the linear / sigmoid angle functions from ``inner = ||x|| cos`` and ``xn``.

    Uses ``pi/2 - theta = asin(cos)``: linear ``g = 2 asin(c) / pi``, sigmoid
    ``g = tanh(asin(c) / (2k)) / tanh(pi / (4k))`` with ``c = inner / xn`` clamped to
    ``[-1+delta, 1-delta]``; the derivative ``1/sqrt(1-c^2)`` is capped at ``cap**-0.5`` (as
    :func:`safe_acos`). One autograd node with in-place elementwise work instead of ~10 (the
    operator is memory-bound once the convolution is done). ``xn`` and ``k`` broadcast to
    ``inner``; their gradients are summed back to their shapes.
    """

    @staticmethod
    def forward(ctx, inner: Tensor, xn: Tensor, k: Tensor | float | None, delta: float, cap: float):  # type: ignore[override]
        # c = inner / xn (times the small reciprocal: cheaper than a full-size divide); inner is saved instead
        # of c, and c recomputed (bit for bit) in the backward: one full-size allocation less in the forward
        a = (inner * xn.reciprocal()).clamp_(-1.0 + delta, 1.0 - delta).asin_()
        ctx.cap, ctx.k_float = cap, None
        if k is None:  # linear
            ctx.save_for_backward(inner, xn)
            ctx.sigmoid = False
            return a.mul_(2.0 / math.pi)
        ctx.sigmoid = True
        if isinstance(k, Tensor):
            u = a.div_(2.0 * k)  # asin(c) / (2k), kept for dg/dk
            t = torch.tanh(u)
            big_t = torch.tanh(math.pi / (4.0 * k))
            ctx.save_for_backward(inner, xn, t, k, u)
            return t * big_t.reciprocal()
        ctx.k_float = float(k)
        t = a.mul_(1.0 / (2.0 * k)).tanh_()
        out = t * (1.0 / math.tanh(math.pi / (4.0 * k)))
        ctx.save_for_backward(inner, xn, t.mul_(t).neg_().add_(1.0))  # only 1 - t^2 is needed: in t's buffer
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # two full-size buffers (c, then r -> grad_inner); everything else in place
        saved = ctx.saved_tensors
        inner, xn = saved[0], saved[1]
        rxn = xn.reciprocal()
        if ctx.sigmoid and ctx.k_float is None:
            return _AsinActivation._backward_learnable(ctx, grad, saved, rxn)
        c = inner * rxn
        r = _asin_slope(c, ctx.cap)  # d asin(c) / dc (capped)
        if not ctx.sigmoid:
            r.mul_(grad)
            chan = 2.0 / math.pi  # constant factors of dg/dc; the per-patch 1/xn is applied after the channel sum
        else:
            r.mul_(saved[2]).mul_(grad)  # saved[2] = 1 - t^2
            k = ctx.k_float
            chan = 1.0 / (2.0 * k * math.tanh(math.pi / (4.0 * k)))
        factor = rxn * chan  # dc/dinner = 1/xn, dc/dxn = -c/xn
        grad_xn = None
        if ctx.needs_input_grad[1]:
            grad_xn = c.mul_(r).sum_to_size(xn.shape).mul_(factor).neg_()
        r.mul_(factor)
        return r, grad_xn, None, None, None

    @staticmethod
    def _backward_learnable(ctx, grad: Tensor, saved: tuple[Tensor, ...], rxn: Tensor):
        """The sigmoid with a tensor ``k`` (learnable): ``dL/dk`` too, still in two full-size buffers (``c`` is
        recomputed once more instead of a third buffer)."""
        inner, xn, t, k, u = saved
        big_t = torch.tanh(math.pi / (4.0 * k))
        b = _one_minus_square(t).mul_(grad)  # grad * (1 - t^2)
        a = None
        grad_k = None
        if ctx.needs_input_grad[2]:
            # g = tanh(u)/T, u = asin(c)/(2k), T = tanh(v), v = pi/(4k):
            # dg/dk = t (1 - T^2) v / (k T^2) - (1 - t^2) u / (k T), constants per filter
            v = math.pi / (4.0 * k)
            coef_t = (1.0 - big_t * big_t) * v / (k * big_t * big_t)
            coef_u = 1.0 / (k * big_t)
            a = torch.mul(b, u)
            term_u = _reduce(a, k.shape)
            grad_k = _reduce(torch.mul(grad, t, out=a), k.shape) * coef_t - term_u * coef_u
        c = inner * rxn if a is None else torch.mul(inner, rxn, out=a)
        r = b.mul_(_asin_slope(c, ctx.cap, out=c)).div_(2.0 * k * big_t)  # c's buffer: the capped asin'(c)
        grad_xn = None
        if ctx.needs_input_grad[1]:
            grad_xn = torch.mul(inner, rxn, out=c).mul_(r).sum_to_size(xn.shape).mul_(rxn).neg_()
        r.mul_(rxn)
        return r, grad_xn, grad_k, None, None


def _channel_dot(t: Tensor, w: Tensor | float, shape: torch.Size) -> Tensor:
    """``(t * w).sum_to_size(shape)`` for ``t`` ``(N, C, *S)`` and a per-channel ``w``: when ``shape`` is
    ``(N, 1, *S)`` and ``w`` ``(1, C, 1, ...)``, one matrix product that reads ``t`` once (no full-size product)."""
    if (isinstance(w, Tensor) and t.dim() >= 3 and t.is_contiguous() and w.numel() == t.shape[1] > 1
            and w.shape[1:2] == t.shape[1:2] and tuple(shape) == (t.shape[0], 1, *t.shape[2:])):
        return torch.matmul(w.reshape(1, -1).to(t.dtype), t.reshape(t.shape[0], t.shape[1], -1)).reshape(shape)
    return (t * w).sum_to_size(shape)


def _one_minus_square(t: Tensor, out: Tensor | None = None) -> Tensor:
    """``1 - t*t`` in one pass (a new tensor, or into ``out``)."""
    if out is None:
        return torch.addcmul(t.new_ones(()), t, t, value=-1.0)
    return torch.addcmul(t.new_ones(()), t, t, value=-1.0, out=out)


def _asin_slope(c: Tensor, cap: float, out: Tensor | None = None) -> Tensor:
    """``1 / sqrt(max(1 - c^2, cap))`` (the capped derivative of ``asin``), a new tensor or into ``out``."""
    return _one_minus_square(c, out).clamp_min_(cap).rsqrt_()


def _reduce(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.sum_to_size(shape)`` that never is ``t`` itself (copied where nothing was reduced, e.g. grouped
    convolutions' per-channel patch norms), so that ``t`` can be reused as scratch space."""
    r = t.sum_to_size(shape)
    return r.clone() if r.data_ptr() == t.data_ptr() else r


def _angle_from_parts(
    inner: Tensor, xn: Tensor, name: str, k: float | Tensor | None, acos_eps: float, grad_cap: float = 1e-6,
    clamp_cos: bool = False,
) -> Tensor:
    """``g(theta)`` from ``inner = ||x|| cos`` and patch norms ``xn`` broadcastable to it.

    ``clamp_cos``: clamp ``cos`` to [-1, 1] (when ``inner`` came from a half-precision convolution, its
    rounding can push ``|cos|`` about 0.4% past 1)."""
    if name in ("cosine", "sqcos", "relu_cos"):
        c = inner * xn.reciprocal()
        if clamp_cos:
            c = c.clamp(-1.0, 1.0)
        return c if name == "cosine" else _activation_from_cos(c, name)
    if name == "linear":
        return _AsinActivation.apply(inner, xn, None, float(acos_eps), float(grad_cap))
    if k is None:
        raise ValueError(f"angle function {name!r} needs k > 0")
    if not isinstance(k, Tensor):
        _check_positive("k", k)
    return _AsinActivation.apply(inner, xn, k, float(acos_eps), float(grad_cap))


#: Angular activations the fused decoupled product computes itself (sigmoid only with a fixed k).
_FUSED_ANGULAR = ("cosine", "sqcos", "relu_cos", "linear", "sigmoid")


def _float_mask(compare, a: Tensor, b: Tensor | float) -> Tensor:
    """``compare(a, b)`` (e.g. ``torch.gt``, broadcast) as 0/1 in ``a``'s dtype:
    multiplying by it is a plain in-place pass, where a boolean mask costs a conversion (or a slow
    ``torch.where``) every time."""
    shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, Tensor) else a.shape
    return compare(a, b, out=torch.empty(shape, dtype=a.dtype, device=a.device))


class _CosineFromParts(torch.autograd.Function):
    """``cos = inner / xn`` (``xn`` broadcast to ``inner``) with one full-size buffer in the backward: ``grad *
    inner`` is summed to ``xn``'s shape, then overwritten by ``dL/dinner = grad / xn`` (autograd's ``inner *
    xn.reciprocal()`` allocates both). Differentiable twice (then without the buffer reuse)."""

    @staticmethod
    def forward(ctx, inner: Tensor, xn: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inner, xn)
        return inner * xn.reciprocal()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        inner, xn = ctx.saved_tensors
        rxn = xn.reciprocal()
        grad_xn = None
        buf = None
        if ctx.needs_input_grad[1]:
            prod = grad * inner
            grad_xn = -(prod.sum_to_size(xn.shape) * (rxn * rxn))
            buf = None if torch.is_grad_enabled() else _unless_aliased(prod, grad_xn)
        grad_inner = None
        if ctx.needs_input_grad[0]:
            grad_inner = grad * rxn if buf is None else torch.mul(grad, rxn, out=buf)
        return grad_inner, grad_xn


def _unless_aliased(buf: Tensor, result: Tensor) -> Tensor | None:
    """``buf`` for reuse as scratch space, or ``None`` where ``result`` (a ``sum_to_size`` of it that reduced
    nothing, as for grouped convolutions' per-channel patch norms) is ``buf`` itself."""
    return None if result.data_ptr() == buf.data_ptr() else buf


class _DecoupledProduct(torch.autograd.Function):
    """Fused ``h(||x||) * g(theta)`` of a standard (unweighted) decoupled operator, ``c = inner / xn``.

    ``magnitude``: ``"tanh"`` / ``"ball"`` / ``"seg"`` (``h`` computed here from ``xn`` and the radius ``rho``,
    as :func:`magnitude_function`) or ``"given"`` (``h`` passed in: a tensor broadcastable to ``xn``, e.g. the
    small ``(N, 1, *S)`` magnitude of linear / log / mix, or a number for sphere). ``angular``: one of
    :data:`_FUSED_ANGULAR` (``k`` a number); ``delta`` / ``cap`` as in :class:`_AsinActivation`.

    One autograd node instead of ~8. The operator is memory-bound once the convolutions are done, and on CPU a
    fresh full-size tensor costs several times an in-place pass (page faults), so the forward allocates only
    ``h``'s factor and the output (``inner`` is saved, ``c`` recomputed), and the hand-written backward works in
    place in two or three full-size buffers, folding every constant into small per-patch / per-channel factors.
    ``xn``, ``h`` and ``rho`` broadcast to ``inner``; their gradients are summed back to their shapes.
    """

    @staticmethod
    def forward(ctx, inner: Tensor, xn: Tensor, h: Tensor | float | None, rho: Tensor | float | None,  # type: ignore[override]
                magnitude: str, alpha: float, beta: float | None, angular: str, k: float | None, delta: float,
                cap: float) -> Tensor:
        rxn = xn.reciprocal()
        # g = const * G; G is not formed for the cosine (G = c: inner and 1/xn go into the product)
        const, big_g = 1.0, None
        if angular != "cosine":
            c = inner * rxn
            if angular == "sqcos":
                big_g = c.mul_(c.abs())
            elif angular == "relu_cos":
                big_g = c.clamp_min_(0.0)
            else:
                big_g = c.clamp_(-1.0 + delta, 1.0 - delta).asin_()
                if angular == "linear":
                    const = 2.0 / math.pi
                else:  # sigmoid
                    big_g = big_g.mul_(1.0 / (2.0 * k)).tanh_()
                    const = 1.0 / math.tanh(math.pi / (4.0 * k))
        # h = hconst * H: H = tanh(z) / min(z, 1) (z = xn / rho), the SegConv h, or the given h
        hconst, big_h = 1.0, h
        if magnitude in ("tanh", "ball"):
            z = xn * _recip(rho)
            if magnitude == "tanh":
                big_h = z.tanh_()
            else:
                big_h = z.clamp_max_(1.0)
            hconst = alpha
        elif magnitude == "seg":
            # alpha xn below rho, beta xn + (alpha - beta) rho above: no full-size select
            low = torch.minimum(xn, rho) if isinstance(rho, Tensor) else xn.clamp_max(rho)
            big_h = low.mul_(alpha - beta).add_(beta * xn)
        elif not isinstance(h, Tensor):
            big_h, hconst = None, h
        scale = hconst * const
        if big_g is None:
            out = torch.mul(big_h, inner).mul_(rxn * scale)
        elif big_h is None:
            out = big_g * scale if angular == "sigmoid" else big_g.mul_(scale)
        else:
            out = torch.mul(big_h, big_g)
            if scale != 1.0:
                out.mul_(scale)
        keep_g = big_g if (big_h is not None or angular == "sigmoid") else None
        rho_float = None if isinstance(rho, Tensor) else rho
        ctx.conf = (magnitude, angular, alpha, beta, k, cap, const, hconst, rho_float)
        ctx.save_for_backward(inner, xn, big_h, keep_g, rho if isinstance(rho, Tensor) else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        inner, xn, big_h, big_g, rho_t = ctx.saved_tensors
        magnitude, angular, alpha, beta, k, cap, const, hconst, rho_float = ctx.conf
        rho = rho_t if rho_t is not None else rho_float
        rxn = xn.reciprocal()
        need_inner, need_xn, need_h, need_rho = ctx.needs_input_grad[:4]
        grad_inner = grad_xn = grad_h = grad_rho = None
        # two full-size buffers, reused (one more for the sigmoid): `a` ends up as dL/dinner; the h side first
        shape = inner.shape
        a = buf = None

        def into(t: Tensor | None) -> Tensor | None:  # t as an out= buffer where it has the full shape
            return t if t is not None and t.shape == shape else None

        # ---- through h: dL/dh = grad * g = grad * G * const
        if magnitude == "given":
            if need_h:
                a = grad * big_g
                grad_h = _reduce(a, big_h.shape).mul_(const)
        elif need_xn or need_rho:
            a = torch.mul(grad, inner).mul_(rxn) if angular == "cosine" else grad * big_g
            if magnitude in ("tanh", "ball"):  # h = alpha phi(z), z = xn / rho
                hscale = const * alpha
                if magnitude == "tanh":  # phi' = 1 - tanh^2
                    buf = torch.mul(a, big_h)
                    a.addcmul_(buf, big_h, value=-1.0)
                else:  # phi' = [z < 1] = [phi < 1] = sign(1 - phi) (clamp_max's gradient is 0 at z == 1)
                    buf = torch.rsub(big_h, 1.0).sign_()
                    a.mul_(buf)
                rinv = _recip(rho)
                if need_rho and rho_t is not None:  # dz/drho = -xn / rho^2
                    buf = torch.mul(a, xn, out=into(buf)) if into(buf) is not None else a * xn
                    grad_rho = _reduce(buf, rho_t.shape).mul_(rinv * rinv * -hscale)
                if need_xn:
                    grad_xn = _channel_dot(a, rinv, xn.shape).mul_(hscale)
            else:  # seg: h = alpha xn below rho, beta xn + (alpha - beta) rho above
                # [xn <= rho] = [sign(rho - xn) >= 0] (the left branch at the tie, as torch.where(xn <= rho, ...))
                buf = torch.rsub(xn, rho).sign_().add_(1.0).clamp_max_(1.0)
                below = buf.mul_(a) if into(buf) is not None else buf * a
                above = a.sub_(below)
                if need_xn:
                    grad_xn = _reduce(below, xn.shape).mul_(alpha).add_(above.sum_to_size(xn.shape), alpha=beta)
                    grad_xn.mul_(const)
                if need_rho and rho_t is not None:
                    grad_rho = _reduce(above, rho_t.shape).mul_((alpha - beta) * const)
        # ---- through g(c), c = inner / xn: dL/dc = grad * h * g'(c)
        if need_inner or need_xn:
            scale = hconst * const
            if angular == "cosine":  # big_h is full here (radius magnitudes)
                a = torch.mul(grad, big_h, out=into(a)) if into(a) is not None else grad * big_h
                if need_xn:
                    buf = torch.mul(a, inner, out=into(buf)) if into(buf) is not None else a * inner
                    part = _reduce(buf, xn.shape).mul_(rxn * rxn * scale)
                    grad_xn = part.neg_() if grad_xn is None else grad_xn.sub_(part)
                grad_inner = a.mul_(rxn * scale)
            else:
                c = torch.mul(inner, rxn, out=into(buf)) if into(buf) is not None else inner * rxn
                out_a = into(a)
                if angular == "sqcos":  # g' = 2 |c|
                    a = (torch.abs(c, out=out_a) if out_a is not None else c.abs()).mul_(grad)
                    chan = 2.0 * scale
                elif angular == "relu_cos":  # clamp_min's gradient is 0 at c == 0
                    a = (torch.gt(c, 0.0, out=out_a) if out_a is not None else _float_mask(torch.gt, c, 0.0))
                    a.mul_(grad)
                    chan = scale
                else:
                    a = _asin_slope(c, cap, out_a).mul_(grad)
                    chan = scale
                    if angular == "sigmoid":  # g' = (1 - t^2) asin'(c) / (2k T)
                        a.mul_(_one_minus_square(big_g))
                        chan = scale / (2.0 * k)
                patch = rxn * chan  # dc/dinner = 1/xn, dc/dxn = -c/xn, times the small factors
                if big_h is not None and big_h.shape == shape:
                    a.mul_(big_h)
                elif big_h is not None:
                    patch = patch * big_h
                if need_xn:
                    part = _reduce(c.mul_(a), xn.shape).mul_(patch)
                    grad_xn = part.neg_() if grad_xn is None else grad_xn.sub_(part)
                grad_inner = a.mul_(patch)
        return grad_inner, grad_xn, grad_h, grad_rho, None, None, None, None, None, None, None


def add_channel_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    """``out + bias`` with a per-channel ``bias`` ``(C,)`` broadcast over ``(N, C, *spatial)`` (``None``: ``out``)."""
    if bias is None:
        return out
    return out + _channel_view(bias, out.dim() - 2).to(out.dtype)


# ----------------------------------------------------------------------------------------------
# SphereConv / SphereLinear
# ----------------------------------------------------------------------------------------------
def sphere_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    angle_fn: str = "cosine",
    k: float | Tensor | None = None,
    eps: float = 1e-4,
    acos_eps: float = 1e-6,
) -> Tensor:
    """SphereConv (eq. 3.1): ``g(theta(w, x)) + b`` for every filter and (zero-padded) patch.

    ``theta = arccos(w^T x / (||w|| ||x||))``; ``g`` = ``angle_fn`` (linear ``1 - 2theta/pi``,
    cosine ``cos theta``, sigmoid / learnable with curvature ``k``; ``none`` = plain conv). Works for
    1-D/2-D/3-D kernels (``weight.dim()`` 3-5), any stride/padding/dilation/groups. ``k`` may be a
    tensor of shape ``(C_out,)`` (one per filter) or a scalar. Output in ``[-1, 1]`` (+ bias).
    """
    check_choice("angle_fn", angle_fn, ANGLE_FNS)
    if angle_fn == "none":
        return _conv_fn(weight)(x, weight, bias, stride, padding, dilation, groups)
    nd = weight.dim() - 2
    inner, xn, _ = normalized_conv(x, weight, stride, padding, dilation, groups, eps)
    lowp = inner.dtype in _HALF
    inner, xn = _float32_block(inner, xn)
    if isinstance(k, Tensor) and k.dim() == 1 and k.numel() > 1:
        k = _channel_view(k, nd)
    xn = _per_channel(xn, inner.shape[1])
    if angle_fn == "cosine" and not lowp:
        out = _CosineFromParts.apply(inner, xn)
    else:
        out = _angle_from_parts(inner, xn, angle_fn, k, acos_eps, clamp_cos=lowp)
    return add_channel_bias(out, bias)


def sphere_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    angle_fn: str = "cosine",
    k: float | Tensor | None = None,
    eps: float = 1e-4,
    acos_eps: float = 1e-6,
) -> Tensor:
    """SphereLinear: ``g(theta(W_i, x)) + b_i`` with ``cos = (x / ||x||) . (W_i / ||W_i||)``.

    A fully connected layer is the SphereConv whose kernel covers the whole input (spherenet spec
    §1.3). ``x``: ``(..., in_features)``; ``k`` scalar or ``(out_features,)``.
    """
    check_choice("angle_fn", angle_fn, ANGLE_FNS)
    if angle_fn == "none":
        return F.linear(x, weight, bias)
    inner, xn, _ = linear_parts(x, weight, eps)
    lowp = inner.dtype in _HALF
    inner, xn = _float32_block(inner, xn)
    out = _angle_from_parts(inner, xn, angle_fn, k, acos_eps, clamp_cos=lowp)
    return out if bias is None else out + bias.to(out.dtype)


# ----------------------------------------------------------------------------------------------
# Decoupled operators
# ----------------------------------------------------------------------------------------------
def decoupled_combine(
    inner: Tensor,
    xn: Tensor | None,
    wn: Tensor,
    magnitude: str = "tanh",
    angular: str = "cosine",
    alpha: float = 1.0,
    rho: Tensor | float | None = None,
    beta: float | None = None,
    k: float | Tensor | None = None,
    weighted: str = "none",
    rho_w: Tensor | float | None = None,
    radius_scale: Tensor | float | str | None = None,
    acos_eps: float = 1e-6,
    fast: bool = True,
    linear: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Second step of a decoupled operator: ``h * g`` from the parts of :func:`normalized_conv`.

    ``inner = ||x|| cos`` is ``(N, C, *S)`` (conv) or ``(..., C)`` (linear, then ``xn`` is ``(..., 1)``);
    ``xn`` the patch norms (``(N, G, *S)`` / ``(..., 1)``), ``wn`` the filter norms ``(C,)``; ``rho``,
    ``rho_w``, ``k`` scalars or ``(C,)``. ``radius_scale`` multiplies ``rho`` (not ``rho_w``) for the
    App. C.2 radius normalization ``rho' = rho * E{||x||}``: a number / tensor (the running mean, eval
    mode), ``"batch"`` (the mean patch norm of this batch, differentiable) or ``"batch_detached"``.
    ``linear=True`` for the fully connected layout. Returns ``(output, batch mean of the patch norms
    or None)``.
    """
    _validate_decoupled(magnitude, angular, weighted, alpha, beta)
    lowp = inner.dtype in _HALF
    if lowp and xn is not None:
        fast = False  # form cos explicitly so that it can be clamped (see _angle_from_parts)
    inner, xn, wn = _float32_block(inner, xn, wn)
    nd = 0 if linear else inner.dim() - 2
    if not linear:
        view = lambda t: _channel_view(t, nd) if isinstance(t, Tensor) and t.dim() == 1 and t.numel() > 1 else t  # noqa: E731
        xn_ch = None if xn is None else _per_channel(xn, inner.shape[1])
        wn = _channel_view(wn, nd)
        rho, rho_w, k = view(rho), view(rho_w), view(k)
    else:
        xn_ch = xn
    batch_mean = None
    if isinstance(radius_scale, str):
        check_choice("radius_scale", radius_scale, ("batch", "batch_detached"))
        if xn is None:
            raise ValueError("radius_scale='batch' needs the patch norms")
        batch_mean = xn.mean()
        radius_scale = batch_mean.detach() if radius_scale == "batch_detached" else batch_mean
    if rho_w is None:
        rho_w = rho  # eq. 4.16 ties the weight radius to rho (before the patch-norm scaling)
    if radius_scale is not None and rho is not None:
        rho = rho * radius_scale
    if fast and angular == "cosine" and magnitude == "linear" and weighted == "none":
        # LinearConv + cos = conv with normalized kernels, no patch norm needed
        return _scaled(alpha, inner), batch_mean
    if xn_ch is None:
        raise ValueError("the patch norms xn are needed for this operator")
    if fast and _fusable(magnitude, angular, weighted, lowp, rho, beta, k):
        # one autograd node for h * g (see _DecoupledProduct); fast=False keeps the autograd composition
        if magnitude in ("tanh", "ball", "seg"):
            return _DecoupledProduct.apply(inner, xn_ch, None, rho, magnitude, alpha, beta, angular, k,
                                           float(acos_eps), _GRAD_CAP), batch_mean
        h = magnitude_function(xn_ch, magnitude, alpha, rho, beta)
        return _DecoupledProduct.apply(inner, xn_ch, h, None, "given", alpha, beta, angular, k, float(acos_eps),
                                       _GRAD_CAP), batch_mean
    if weighted == "nonlinear_joint":
        h = _scaled(alpha, torch.tanh(xn_ch * (wn * _recip(rho))))
    elif weighted == "nonlinear_separate":
        h = _scaled(alpha, torch.tanh(wn * _recip(rho_w)) * torch.tanh(xn_ch * _recip(rho)))
    else:
        h = magnitude_function(xn_ch, magnitude, alpha, rho, beta)
        if weighted == "linear":
            h = h * wn
    if fast and angular == "cosine":
        # f = h * inner / ||x||: the per-patch factor h/||x|| is formed first (often a small tensor)
        return inner * (h * xn_ch.reciprocal()), batch_mean
    check_choice("angular", angular, ANGULAR_ACTIVATIONS)
    g = _angle_from_parts(inner, xn_ch, angular, k, acos_eps, clamp_cos=lowp)
    return h * g, batch_mean


_GRAD_CAP = 1e-6  # the arccos derivative cap of _angle_from_parts


def _fusable(magnitude: str, angular: str, weighted: str, lowp: bool, rho, beta, k) -> bool:
    """Whether :class:`_DecoupledProduct` computes this operator (else the autograd composition does, which also
    raises the missing-parameter errors). Cosine with a radius-free magnitude is already one small factor times
    ``inner``; half-precision inputs clamp ``cos`` (see :func:`_angle_from_parts`)."""
    if weighted != "none" or lowp or angular not in _FUSED_ANGULAR:
        return False
    if angular == "sigmoid":
        if k is None or isinstance(k, Tensor):
            return False
        _check_positive("k", k)
    if magnitude in ("tanh", "ball", "seg"):
        return rho is not None and (magnitude != "seg" or beta is not None)
    if magnitude in ("mix", "seg") and beta is None:
        return False
    return angular != "cosine"


def check_weighted(weighted: str, magnitude: str) -> str:
    """Validate a weighted-operator mode: one of :data:`WEIGHTED_MODES`, the nonlinear ones only with
    ``magnitude="tanh"`` (eq. 4.15/4.16)."""
    check_choice("weighted", weighted, WEIGHTED_MODES)
    if weighted.startswith("nonlinear") and magnitude != "tanh":
        argument_error("weighted", weighted, f"'none', 'linear' for magnitude={magnitude!r}",
                       fix="the nonlinear weighted operators (eq. 4.15/4.16) are defined only for magnitude='tanh'")
    return weighted


def _validate_decoupled(magnitude: str, angular: str, weighted: str, alpha: float, beta: float | None) -> None:
    check_choice("magnitude", magnitude, MAGNITUDE_FNS)
    check_choice("angular", angular, ANGULAR_ACTIVATIONS)
    check_weighted(weighted, magnitude)
    _check_positive("alpha", alpha, allow_zero=magnitude == "mix")
    if magnitude in ("seg", "mix"):
        _check_positive("beta", beta, allow_zero=True)


def decoupled_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    magnitude: str = "tanh",
    angular: str = "cosine",
    alpha: float = 1.0,
    rho: Tensor | float | None = None,
    beta: float | None = None,
    k: float | Tensor | None = None,
    weighted: str = "none",
    rho_w: Tensor | float | None = None,
    radius_scale: Tensor | float | str | None = None,
    eps: float = 1e-4,
    acos_eps: float = 1e-6,
    fast: bool = True,
) -> Tensor:
    """Decoupled convolution ``f = h(||w||, ||x||) * g(theta)`` (eq. 4.3) for every filter and patch.

    ``rho``: operator radius (scalar or ``(C_out,)``), multiplied by ``radius_scale`` (App. C.2, see
    :func:`decoupled_combine`). ``weighted``: ``none`` (standard, ``h(||x||)``), ``linear``
    (``||w|| h(||x||)``), ``nonlinear_joint`` (eq. 4.15, ``alpha tanh(||x|| ||w|| / rho)``),
    ``nonlinear_separate`` (eq. 4.16, ``alpha tanh(||w||/rho_w) tanh(||x||/rho)``, ``rho_w``
    defaults to ``rho`` before scaling). ``fast`` uses ``f = inner * h/||x||`` for the cosine
    activation (identical result, fewer full-size ops). Returns ``(N, C_out, *out)``.
    """
    _validate_decoupled(magnitude, angular, weighted, alpha, beta)
    linear_fast = fast and angular == "cosine" and magnitude == "linear" and weighted == "none"
    need_xn = not linear_fast or isinstance(radius_scale, str)
    inner, xn, wn = normalized_conv(x, weight, stride, padding, dilation, groups, eps, need_patch_norms=need_xn)
    if rho_w is None and weighted == "nonlinear_separate":
        rho_w = rho
    out, _ = decoupled_combine(
        inner, xn, wn, magnitude, angular, alpha, rho, beta, k, weighted, rho_w, radius_scale, acos_eps, fast
    )
    return add_channel_bias(out, bias)


def decoupled_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    magnitude: str = "tanh",
    angular: str = "cosine",
    alpha: float = 1.0,
    rho: Tensor | float | None = None,
    beta: float | None = None,
    k: float | Tensor | None = None,
    weighted: str = "none",
    rho_w: Tensor | float | None = None,
    radius_scale: Tensor | float | str | None = None,
    eps: float = 1e-4,
    acos_eps: float = 1e-6,
    fast: bool = True,
) -> Tensor:
    """Decoupled fully connected layer: :func:`decoupled_conv` with ``x: (..., in_features)``.

    ``rho``, ``rho_w``, ``k`` are scalars or ``(out_features,)`` tensors.
    """
    inner, xn, wn = linear_parts(x, weight, eps)
    if rho_w is None and weighted == "nonlinear_separate":
        rho_w = rho
    out, _ = decoupled_combine(
        inner, xn, wn, magnitude, angular, alpha, rho, beta, k, weighted, rho_w, radius_scale, acos_eps, fast,
        linear=True,
    )
    return out if bias is None else out + bias.to(out.dtype)


def linear_parts(x: Tensor, weight: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """``(inner, xn, wn)`` for a fully connected layer: ``inner = x . W_i/||W_i||`` (``(..., out)``),
    ``xn = sqrt(||x||^2 + eps)`` (``(..., 1)``), ``wn`` the row norms ``(out,)``."""
    wn = filter_norms(weight, eps)
    inner = F.linear(x, weight / wn[:, None])
    xn = torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps)
    return inner, xn, wn
