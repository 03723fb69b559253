r"""DH2L hierarchical regularizer 'H' as a callback (DH2L §3.1.2, eq. 4-7 and appendix; spec ``dh2l.md`` §3).

The penalty's math is :func:`lightning_hyper.functional.hierarchy.hierarchical_penalty` (re-exported here with
``CONSTRAINTS``, ``PAIR_SCOPES`` and ``parse_constraints``); this module is the Lightning glue around it.

.. math::
    R = \lambda_l\big(\lambda_p R_{l,p} + \lambda_c R_{l,c}\big) + \sum_k \lambda_k C_{k}
        + \lambda_o \sum_l \|\Delta C_l \Delta C_l^\top - I\|_F

* :math:`R_{l,p}` (within groups): for each group with at least two classes present, the mean of
  the metric's minimized term over its ordered class pairs of :math:`w_i = s_i - c_g`, averaged
  over those groups (eq. 6; groups with one class present have no pair and are left out).
* :math:`R_{l,c}` (between groups): per group level, the mean term over ordered pairs of distinct
  groups present of their center offsets :math:`\Delta c = w_c^{(l,l-1)}` (eq. 7); summed over
  group levels (one level for super-class -> class).
* C1-C3: hinge penalties of :func:`~lightning_hyper.functional.hierarchy.containment_violations` and
  :func:`~lightning_hyper.functional.hierarchy.sibling_margin_violations`, averaged over the groups
  (C1, C2) or sibling pairs (C3) present, summed over levels. A group's sphere has its center
  :math:`c_g` and the mean radius of its children (:math:`\|w_i\|` for classes; for subgroups
  their group vector norm :math:`\|a_h\|`, or :math:`\|\Delta c_h\|` without group vectors); its
  outer sphere, inside the parent's, has radius :math:`\|a_g\|` (so C1/C2 need group vectors).
* :math:`\lambda_o`: orthogonality of the centers (001 §3.1.2), Frobenius norm.

Mini-batch hierarchy (the paper's default, §4.1): only the classes in the batch's labels and
their ancestors enter (``pairs="batch"``); ``pairs="full"`` uses the whole known hierarchy.
"""
from __future__ import annotations

import warnings
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from lightning_hyper.callbacks.base import DEFAULT_MAX_GRAD_NORM, PenaltyCallback
from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.discrete import (
    DISCRETE_MODES,
    GM_FORMS,
    canonical_metric,
    check_metric_options,
)
from lightning_hyper.functional.hierarchy import (
    CONSTRAINTS,
    PAIR_SCOPES,
    Hierarchy,
    HierarchyGeometry,
    hierarchical_penalty,
    mean_geometry,
    parse_constraints,
    present_classes,
)
from lightning_hyper.nn.hierarchical import HierarchicalLinear
from lightning_hyper.nn.selection import NeuronGroup, call_whole

__all__ = ["CONSTRAINTS", "PAIR_SCOPES", "HierarchicalRegularizer", "hierarchical_penalty", "parse_constraints"]

class HierarchicalRegularizer(PenaltyCallback):
    """DH2L's hierarchical regularization 'H' on a hierarchical classifier layer, as a callback.

    Acts on every selected :class:`~lightning_hyper.nn.hierarchical.HierarchicalLinear` (by default
    the model's output layer), or, given ``hierarchy``, on a plain output layer whose rows are the
    classes (centers = group means of the rows, see
    :func:`~lightning_hyper.functional.hierarchy.mean_geometry`).

    Args:
        metric: DH2L metric of both terms (:data:`lightning_hyper.functional.discrete.METRICS`);
            default ``"AMcos"`` (the best single metric of the paper's ablation, Table 5).
        weight: :math:`\\lambda_l` (paper: 0.1 x {1, 5}).
        within_weight, between_weight: relative weights of :math:`R_{l,p}` and :math:`R_{l,c}`.
        constraints: ``None`` (off), a list of ``"C1"``, ``"C2"``, ``"C3"`` (weight 1 each) or a
            dict name -> :math:`\\lambda_k`.
        center_orthogonality: :math:`\\lambda_o` (001: 1e-4); 0 disables it.
        hierarchy: the label hierarchy for a plain output layer (optional for a
            ``HierarchicalLinear``, then it must equal the layer's).
        pairs: ``"batch"`` (only the classes of the batch's labels and their ancestors, the paper's
            default) or ``"full"`` (the whole hierarchy every step).
        discrete, clamp, gm, threshold: options of the metric (see
            :func:`~lightning_hyper.functional.discrete.pairwise_metric`).
        include, exclude, layer_types, output_layer, inputs, verbose, mode, labels, on_nonfinite,
            max_grad_norm, prefix, every_n_steps: see :class:`~lightning_hyper.callbacks.base.PenaltyCallback`
            (``max_grad_norm`` bounds the gradient through a plain output layer's rows; a
            ``HierarchicalLinear``'s geometry is read from the layer itself).

    Logs ``dh2l/penalty`` and per layer ``dh2l/within/<layer>``, ``dh2l/between/<layer>`` (and the
    enabled constraints / ``orthogonality``).
    """

    prefix = "dh2l"

    def __init__(self, metric: str = "AMcos", weight: float = 0.1, within_weight: float = 1.0,
                 between_weight: float = 1.0, constraints: Sequence[str] | Mapping[str, float] | None = None,
                 center_orthogonality: float = 0.0, hierarchy: Any = None, pairs: str = "batch",
                 discrete: str = "binary", clamp: float = 0.99, gm: str = "product", threshold: float = 0.0,
                 include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True,
                 mode: str = "auto", labels: Callable[[Any], Tensor | None] | None = None,
                 on_nonfinite: str = "error", max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
                 prefix: str | None = None, every_n_steps: int = 1) -> None:
        super().__init__(include=include, exclude=exclude, layer_types=layer_types, output_layer=output_layer,
                         inputs=inputs, verbose=verbose, mode=mode, labels=labels, on_nonfinite=on_nonfinite,
                         max_grad_norm=max_grad_norm, prefix=prefix, every_n_steps=every_n_steps)
        owner = type(self).__name__
        self.metric = canonical_metric(metric)
        check_choice("pairs", pairs, PAIR_SCOPES, owner=owner)
        check_choice("discrete", discrete, DISCRETE_MODES, owner=owner)
        check_choice("gm", gm, GM_FORMS, owner=owner)
        self.weight = check_number("weight", weight, low=0, low_inclusive=True, owner=owner)
        self.within_weight = check_number("within_weight", within_weight, low=0, low_inclusive=True, owner=owner)
        self.between_weight = check_number("between_weight", between_weight, low=0, low_inclusive=True, owner=owner)
        self.constraints = parse_constraints(constraints)
        self.center_orthogonality = check_number("center_orthogonality", center_orthogonality, low=0,
                                                 low_inclusive=True, owner=owner)
        self.hierarchy = Hierarchy.parse(hierarchy) if hierarchy is not None else None
        self.pairs = pairs
        self.metric_kwargs = {"discrete": discrete, "clamp": clamp, "gm": gm, "threshold": threshold}
        check_metric_options(discrete, clamp, gm, threshold)
        self._warned_no_labels = False

    # ------------------------------------------------------------------ helpers
    def _applies(self, layer: NeuronGroup) -> bool:
        return isinstance(layer.module, HierarchicalLinear) or (layer.role == "output" and self.hierarchy is not None)

    def validate_layers(self, layers: list[NeuronGroup]) -> None:
        if not any(self._applies(layer) for layer in layers):
            names = [f"{layer.name} ({type(layer.module).__name__}, {layer.role})" for layer in layers]
            raise ValueError("HierarchicalRegularizer found no hierarchical layer: use a HierarchicalLinear head "
                             "(e.g. HypersphericalClassifier(head='hierarchical', head_kwargs={'hierarchy': ...})) "
                             f"or pass hierarchy=... for a plain output layer; selected layers: {names}")
        for layer in layers:
            if isinstance(layer.module, HierarchicalLinear) and self.hierarchy is not None \
                    and layer.module.hierarchy != self.hierarchy:
                raise ValueError(f"hierarchy: the regularizer's {self.hierarchy} differs from layer {layer.name!r}'s "
                                 f"{layer.module.hierarchy}")

    def geometry(self, layer: NeuronGroup) -> HierarchyGeometry:
        """The layer's current hierarchical geometry (with autograd graph)."""
        if isinstance(layer.module, HierarchicalLinear):
            return call_whole(layer.module, lambda m: m.geometry())  # (FSDP2: from its gathered parameters)
        rows = self.neurons(layer)
        if rows.dim() != 2 or rows.shape[0] != self.hierarchy.num_classes:
            raise ValueError(f"hierarchy covers {self.hierarchy.num_classes} classes but layer {layer.name!r} has "
                             f"{rows.shape[0]} rows")
        return mean_geometry(rows, self.hierarchy)

    # ------------------------------------------------------------------ PenaltyCallback API
    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        if not self._applies(layer):
            return None
        geo = self.geometry(layer)
        classes = None
        if self.pairs == "batch":
            if labels is None:
                if not self._warned_no_labels:
                    warnings.warn("HierarchicalRegularizer(pairs='batch') found no labels in the batch; using the "
                                  "full hierarchy. Pass labels=<batch -> labels getter>.", stacklevel=2)
                    self._warned_no_labels = True
            else:
                classes = present_classes(labels, geo.hierarchy)
        return hierarchical_penalty(geo, classes, self.metric, self.weight, self.within_weight, self.between_weight,
                                    self.constraints, self.center_orthogonality, **self.metric_kwargs)
