"""Orthogonality of SphereNet / DCNet kernels as a penalty callback (spherenet spec §5, dcnet spec §8.5).

SphereNet (thesis §3.2.4, App. D.5) regularizes angles instead of norms: it replaces weight decay on
the SphereConv kernels by the *orthonormal* penalty, per layer, summed over layers,

.. math::
    \\lambda \\sum_l \\|W_l W_l^\\top - I\\|_F^2 \\qquad (W_l: n \\times d,\\ \\text{row } i = \\text{kernel } w_i),

on the raw kernels (so it also pins every ``||w_i||`` near 1, which keeps the ``1/||w||`` gradient scale
of the operator near 1), with ``lambda = 1e-4`` in the reference code. DCNet (thesis §4.5, App. C.1)
uses the *orthogonal* form :math:`\\|W W^\\top - \\mathrm{diag}(W W^\\top)\\|_F^2` on normalized kernels
(its reference code: ``1e-5 * ½ ||Ŵ Ŵᵀ − I||²``, i.e. ``weight=5e-6``, ``form="orthogonal"``,
``normalize=True``). The formula is :func:`lightning_hyper.functional.orthogonal.kernel_orthogonality`.

This is not OPT's :class:`~lightning_hyper.callbacks.orthogonal.OrthogonalRegularizer`, which penalizes
the learned rotation ``R`` of OPT layers (square, ``RᵀR = I``); here the kernels themselves are pushed
apart.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_hyper.callbacks.base import DEFAULT_MAX_GRAD_NORM, PenaltyCallback
from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.orthogonal import ORTHOGONALITY_FORMS, kernel_orthogonality
from lightning_hyper.nn.decoupled import DecoupledOperator
from lightning_hyper.nn.selection import NeuronGroup
from lightning_hyper.nn.sphere import SphereOperator

__all__ = ["LAYER_SCOPES", "SphereOrthogonalityRegularizer", "is_operator_layer"]

#: Which selected layers are regularized.
LAYER_SCOPES: tuple[str, ...] = ("operators", "all")


def is_operator_layer(module: nn.Module) -> bool:
    """True for SphereConv*/SphereLinear (``angle_fn != "none"``) and DecoupledConv*/DecoupledLinear layers."""
    if isinstance(module, SphereOperator):
        return module.angle_fn != "none"
    return isinstance(module, DecoupledOperator)


class SphereOrthogonalityRegularizer(PenaltyCallback):
    """Adds ``weight * sum_l P(W_l)`` over the hidden SphereNet / DCNet operator layers and logs it.

    Args:
        weight: :math:`\\lambda` (SphereNet reference code: 1e-4 on the squared Frobenius norm; DCNet: 5e-6).
        form: ``"orthonormal"`` (:math:`\\|WW^\\top - I\\|_F^2`, SphereNet) or ``"orthogonal"``
            (:math:`\\|WW^\\top - \\mathrm{diag}(WW^\\top)\\|_F^2`, DCNet).
        normalize: penalize the normalized kernels ``w / sqrt(||w||^2 + eps)`` (DCNet) instead of the raw ones
            (SphereNet default).
        eps: added to ``||w||^2`` when normalizing.
        layers: ``"operators"`` (default: only SphereConv*/SphereLinear with ``angle_fn != "none"`` and
            Decoupled* layers, so plain 1x1 shortcut convs and BN stay free) or ``"all"`` (every selected
            hidden group, e.g. for the plain-CNN baseline of the same architecture).
            The output classifier is never regularized (thesis: every SphereConv layer including the
            hidden FC layer, not the classifier).
        include, exclude, layer_types, output_layer, inputs, verbose, mode, on_nonfinite, max_grad_norm,
            prefix, every_n_steps: see :class:`~lightning_hyper.callbacks.base.PenaltyCallback`.

    A grouped convolution's term is the mean of its channel groups' terms.

    Logs ``sphere_orth/penalty`` (weighted sum), ``sphere_orth/orthogonality/<layer>`` (the unweighted
    per-layer term) and ``sphere_orth/filter_norm/<layer>`` (mean kernel norm, which the orthonormal form
    drives to 1).
    """

    prefix = "sphere_orth"

    def __init__(self, weight: float = 1e-4, form: str = "orthonormal", normalize: bool = False, eps: float = 0.0,
                 layers: str = "operators", *, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True, mode: str = "auto",
                 labels: Callable[[Any], Tensor | None] | None = None, on_nonfinite: str = "error",
                 max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM, prefix: str | None = None,
                 every_n_steps: int = 1) -> None:
        super().__init__(include=include, exclude=exclude, layer_types=layer_types, output_layer=output_layer,
                         inputs=inputs, verbose=verbose, mode=mode, labels=labels, on_nonfinite=on_nonfinite,
                         max_grad_norm=max_grad_norm, prefix=prefix, every_n_steps=every_n_steps)
        owner = type(self).__name__
        self.weight = check_number("weight", weight, low=0, low_inclusive=True, owner=owner)
        self.form = check_choice("form", form, ORTHOGONALITY_FORMS, owner=owner)
        self.normalize = bool(normalize)
        self.eps = check_number("eps", eps, low=0, low_inclusive=True, owner=owner)
        self.layers_scope = check_choice("layers", layers, LAYER_SCOPES, owner=owner)

    def _applies(self, layer: NeuronGroup) -> bool:
        if layer.role == "output":
            return False
        return self.layers_scope == "all" or is_operator_layer(layer.module)

    def validate_layers(self, layers: list[NeuronGroup]) -> None:
        if not any(self._applies(layer) for layer in layers):
            names = [f"{layer.name} ({type(layer.module).__name__}, {layer.role})" for layer in layers]
            raise ValueError(
                "SphereOrthogonalityRegularizer found no hidden layer to regularize: with layers='operators' it "
                "needs SphereConv*/SphereLinear (angle_fn != 'none') or Decoupled* layers (convert a model with "
                "lightning_hyper.nn.convert, or pass layers='all'); the output classifier is never regularized. "
                f"Selected layers: {names}"
            )

    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        if not self._applies(layer):
            return None
        w = self.neurons(layer)
        w = w if w.dtype == torch.float64 else w.float()
        sets = list(w) if w.dim() == 3 else [w]  # a grouped convolution: the mean over its groups
        values = [kernel_orthogonality(n, self.form, self.normalize, self.eps) for n in sets]
        value = values[0] if len(values) == 1 else torch.stack(values).mean()
        return {
            "penalty": self.weight * value,
            "orthogonality": value.detach(),
            "filter_norm": torch.linalg.vector_norm(w.detach(), dim=-1).mean(),
        }
