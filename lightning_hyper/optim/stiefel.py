"""Orthogonality-preserving gradient descent (OGD) on the orthogonal group (thesis §7.3.5; Li et al., ICLR'20).

:class:`StiefelCayleySGD` keeps square parameters orthogonal with the Cayley step of
:func:`lightning_hyper.functional.orthogonal.stiefel_cayley_step`; :func:`attach_ogd` lets it ride along with any
training loop that steps one main optimizer. OPT's ``method="ogd"`` (:func:`lightning_hyper.nn.opt.apply_opt`)
trains its rotations this way. Both names are also importable from :mod:`lightning_hyper.nn` and
:mod:`lightning_hyper.nn.opt`.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterable

import torch
from torch import nn

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.orthogonal import stiefel_cayley_step

__all__ = ["StiefelCayleySGD", "attach_ogd"]


class StiefelCayleySGD(torch.optim.Optimizer):
    """Orthogonality-preserving gradient descent for square rotations (thesis §7.3.5; Li et al., ICLR'20).

    Per parameter ``X`` (orthogonal, ``(d, d)`` or a batch of blocks) with gradient ``G``:
    ``M ← momentum·M − G``; ``Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)``, ``W = Ŵ − Ŵᵀ``; ``M ← W X``;
    ``X ← Cayley step`` with ``α = min(lr, 1/‖W‖_F)`` (see
    :func:`~lightning_hyper.functional.orthogonal.stiefel_cayley_step`). ``solve="exact"`` (default)
    keeps ``X`` orthogonal to rounding error; ``"fixed_point"`` is the thesis' 2-iteration scheme,
    whose drift ``reorth_every = k`` removes by projecting onto the polar factor every ``k`` steps.
    ``polish`` (default: on for ``"exact"``) follows each step with one Newton-Schulz step
    ``X ← X(3I − XᵀX)/2`` (two matmuls), which squares the orthogonality error, so float32 rounding
    does not accumulate over thousands of steps. No weight decay (the official code trains rotations
    on the data loss only).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.9, solve: str = "exact", iters: int = 2,
                 reorth_every: int = 0, polish: bool | None = None) -> None:
        owner = "StiefelCayleySGD"
        check_number("lr", lr, low=0.0, owner=owner)
        check_number("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False, owner=owner)
        check_choice("solve", solve, ("exact", "fixed_point"), owner=owner)
        check_number("iters", iters, low=0, low_inclusive=True, integer=True, owner=owner)
        check_number("reorth_every", reorth_every, low=0, low_inclusive=True, integer=True, owner=owner)
        polish = solve == "exact" if polish is None else bool(polish)
        super().__init__(params, dict(lr=lr, momentum=momentum, solve=solve, iters=iters, reorth_every=reorth_every,
                                      polish=polish))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
                    raise ValueError(f"StiefelCayleySGD needs square (..., d, d) parameters, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                M = state["momentum_buffer"].mul_(group["momentum"]).sub_(p.grad)
                Y, W = stiefel_cayley_step(p, M, group["lr"], solve=group["solve"], iters=group["iters"])
                state["momentum_buffer"] = W @ p
                if group["polish"]:
                    Y = 1.5 * Y - 0.5 * Y @ (Y.mT @ Y)
                p.copy_(Y)
                state["step"] += 1
                k = group["reorth_every"]
                if k and state["step"] % k == 0:
                    U, _, Vh = torch.linalg.svd(p)
                    p.copy_(U @ Vh)
        return loss


def attach_ogd(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter] | nn.Module, lr: float = 0.02,
               momentum: float = 0.9, **kwargs: Any) -> StiefelCayleySGD:
    """Step a :class:`StiefelCayleySGD` over ``params`` (or a model's OPT rotations) right after every
    ``optimizer.step()`` (a step post-hook), then clear their gradients.

    This lets OGD ride along with any training loop that steps one optimizer (e.g. Lightning's
    automatic optimization). The rotations must not be in ``optimizer`` itself. Returns the OGD
    optimizer (keep a reference; ``ogd.hook_handle.remove()`` detaches it).
    """
    if isinstance(params, nn.Module):
        from lightning_hyper.nn.opt import rotation_parameters  # nn/ builds on optim/, not the other way round

        params = rotation_parameters(params)
    params = list(params)
    if not params:
        raise ValueError("attach_ogd: no rotation parameters given (was apply_opt(method='ogd') applied?)")
    main = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) in main for p in params):
        raise ValueError("attach_ogd: the rotations are also in the main optimizer; build it from "
                         "split_opt_parameters(model)[1]")
    ogd = StiefelCayleySGD(params, lr=lr, momentum=momentum, **kwargs)

    def _post_step(opt, args, kw) -> None:
        ogd.step()
        ogd.zero_grad(set_to_none=True)

    ogd.hook_handle = optimizer.register_step_post_hook(_post_step)  # type: ignore[attr-defined]
    return ogd
