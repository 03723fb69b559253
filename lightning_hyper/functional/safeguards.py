"""Numerical safeguards for penalties on neurons (no Lightning).

:func:`bound_gradient_norm` is the identity in the forward pass; in the backward pass it rescales the
incoming gradient so that its Frobenius norm is at most ``max_norm``. The penalty callbacks put it
between a layer's neurons and the penalty math, so that nearly identical neurons (whose Riesz energy
gradient grows like ``1 / distance^(s+1)``) cannot send one huge step into the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bound_gradient_norm"]


class _BoundGradientNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, max_norm: Tensor | float) -> Tensor:  # type: ignore[override]
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # differentiable in ``grad`` (a detached scale times grad), so double backward still works
        norm = torch.linalg.vector_norm(grad.detach().to(torch.float64 if grad.dtype == torch.float64
                                                         else torch.float32))
        limit = ctx.max_norm
        if isinstance(limit, Tensor):
            limit = limit.to(device=norm.device, dtype=norm.dtype)
        # finite norm > limit: scale down; a NaN/Inf gradient is passed on unchanged (the callers report it)
        if grad.device.type == "cpu" and not bool(norm > limit):  # (a host check costs nothing on CPU; on an
            return grad, None  # accelerator it would stall the stream, so there the scale is always applied)
        scale = torch.where(torch.isfinite(norm) & (norm > limit), limit / norm.clamp_min(1e-30),
                            torch.ones_like(norm))
        return grad * scale.to(grad.dtype), None


def bound_gradient_norm(x: Tensor, max_norm: float | Tensor) -> Tensor:
    """Identity whose backward caps the gradient's Frobenius norm at ``max_norm``.

    Args:
        x: any tensor (e.g. a layer's neurons ``(N, d)`` or ``(G, N, d)``).
        max_norm: the largest Frobenius norm of ``d loss / d x`` let through (> 0); a larger gradient is
            scaled down to this norm (its direction is kept). A gradient with NaN/Inf entries is passed
            on unchanged.

    Returns:
        ``x`` (a view), with the bounded backward attached.
    """
    if not isinstance(max_norm, Tensor) and not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} is not supported; accepted values: a number > 0")
    if not x.requires_grad:
        return x
    return _BoundGradientNorm.apply(x, max_norm)
