r"""DH2L hierarchical regularizer 'H' as a callback (DH2L §3.1.2, eq. 4-7 and appendix; spec ``dh2l.md`` §3).

.. math::
    R = \lambda_l\big(\lambda_p R_{l,p} + \lambda_c R_{l,c}\big) + \sum_k \lambda_k C_{k}
        + \lambda_o \sum_l \|\Delta C_l \Delta C_l^\top - I\|_F

* :math:`R_{l,p}` (within groups): for each group with at least two classes present, the mean of
  the metric's minimized term over its ordered class pairs of :math:`w_i = s_i - c_g`, averaged
  over those groups (eq. 6; groups with one class present have no pair and are left out).
* :math:`R_{l,c}` (between groups): per group level, the mean term over ordered pairs of distinct
  groups present of their center offsets :math:`\Delta c = w_c^{(l,l-1)}` (eq. 7); summed over
  group levels (one level for super-class -> class).
* C1-C3: hinge penalties of :func:`~lightning_hyper.nn.hierarchical.containment_violations` and
  :func:`~lightning_hyper.nn.hierarchical.sibling_margin_violations`, averaged over the groups
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
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_hyper.callbacks.base import DEFAULT_MAX_GRAD_NORM, PenaltyCallback, finite_or_raise
from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.discrete import (
    DISCRETE_MODES,
    GM_FORMS,
    canonical_metric,
    check_metric_options,
    grouped_metric_energy,
    metric_energy,
)
from lightning_hyper.nn.hierarchical import (
    Hierarchy,
    HierarchyGeometry,
    HierarchicalLinear,
    containment_violations,
    group_radii,
    mean_geometry,
    safe_norm,
    sibling_margin_violations,
)
from lightning_hyper.nn.selection import NeuronGroup, call_whole

__all__ = ["CONSTRAINTS", "PAIR_SCOPES", "HierarchicalRegularizer", "hierarchical_penalty", "parse_constraints"]

CONSTRAINTS = ("C1", "C2", "C3")
PAIR_SCOPES = ("batch", "full")


def parse_constraints(constraints: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """``None`` -> no constraint; ``["C1", "C3"]`` -> weight 1 each; ``{"C1": 0.1}`` -> those weights."""
    if constraints is None:
        return {}
    if isinstance(constraints, str):
        constraints = [constraints]
    items = constraints.items() if isinstance(constraints, Mapping) else ((c, 1.0) for c in constraints)
    out: dict[str, float] = {}
    for name, w in items:
        if name not in CONSTRAINTS:
            raise ValueError(f"constraints: {name!r} is not supported; accepted values: {list(CONSTRAINTS)} "
                             "(a list of names, or a dict name -> weight)")
        out[name] = finite_or_raise(w, f"constraints[{name!r}]", 0.0)
    return out


def _present(geo: HierarchyGeometry, classes: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    """Class ids and, per group level, the group ids that enter (sorted, unique)."""
    h = geo.hierarchy
    device = geo.class_vectors.device
    if classes is None:
        cls = torch.arange(h.num_classes, device=device)
    else:
        cls = torch.unique(classes.to(device))
    groups = [torch.unique(a) for a in h.class_ancestors(cls)]
    return cls, groups


def hierarchical_penalty(geo: HierarchyGeometry, classes: Tensor | None = None, metric: str = "AMcos",
                         weight: float = 0.1, within_weight: float = 1.0, between_weight: float = 1.0,
                         constraints: Sequence[str] | Mapping[str, float] | None = None,
                         center_orthogonality: float = 0.0, **metric_kwargs: Any) -> dict[str, Tensor]:
    """The DH2L regularizer of one hierarchical layer (module docstring), as a dict of its terms.

    Args:
        geo: the layer's :class:`~lightning_hyper.nn.hierarchical.HierarchyGeometry`.
        classes: class ids of the batch (``None``: the full hierarchy); repeated ids are fine.
        metric: a name of :data:`lightning_hyper.functional.discrete.METRICS`.
        metric_kwargs: ``discrete``, ``clamp``, ``gm``, ``threshold`` of the metric.

    Returns ``{"penalty": weighted total, "within": R_p, "between": R_c, <constraint>: C_k,
    "orthogonality": ...}`` (unweighted terms; constraints and orthogonality only when enabled).
    """
    metric = canonical_metric(metric)
    cweights = parse_constraints(constraints)
    h = geo.hierarchy
    L = h.num_group_levels
    cls, groups = _present(geo, classes)
    w = geo.class_vectors
    zero = w.sum() * 0.0
    out: dict[str, Tensor] = {}
    # R_{l,p}: class pairs inside each lowest-level group present
    class_groups = h.parent_tensor(L, w.device)[cls]
    out["within"] = grouped_metric_energy(w[cls], class_groups, metric, **metric_kwargs) if cls.numel() > 1 else zero
    # R_{l,c}: pairs of distinct groups present, per level
    between = zero
    for k in range(L):
        if groups[k].numel() > 1:
            between = between + metric_energy(geo.center_offsets[k][groups[k]], metric, **metric_kwargs)
    out["between"] = between
    total = weight * (within_weight * out["within"] + between_weight * out["between"])
    if cweights:
        if ("C1" in cweights or "C2" in cweights) and geo.group_vectors is None:
            raise ValueError("constraints C1/C2 need each group's outer radius: use HierarchicalLinear("
                             "center='anchored') or group_vectors=True (C3 works with any layer)")
        values = {name: zero for name in cweights}
        for k in range(L):
            g = groups[k]
            # radius of each present group's sphere = mean radius of its present children
            if k == L - 1:
                child_radius, child_parent = safe_norm(w[cls]), class_groups
            else:
                child = groups[k + 1]
                vec = geo.group_vectors[k + 1] if geo.group_vectors is not None else geo.center_offsets[k + 1]
                child_radius, child_parent = safe_norm(vec[child]), h.parent_tensor(k + 1, w.device)[child]
            radii, _ = group_radii(child_radius, child_parent, h.sizes[k])
            if "C1" in cweights or "C2" in cweights:
                outer = safe_norm(geo.group_vectors[k][g])
                c1, c2 = containment_violations(radii[g], outer, safe_norm(geo.center_offsets[k][g]))
                if "C1" in cweights:
                    values["C1"] = values["C1"] + c1.mean()
                if "C2" in cweights:
                    values["C2"] = values["C2"] + c2.mean()
            if "C3" in cweights and g.numel() > 1:
                parents = (h.parent_tensor(k, w.device)[g] if k > 0 else torch.zeros_like(g))
                c3 = sibling_margin_violations(geo.centers[k][g], radii[g], parents)
                if c3.numel():
                    values["C3"] = values["C3"] + c3.mean()
        for name, value in values.items():
            out[name] = value
            total = total + cweights[name] * value
    if center_orthogonality:
        orth = zero
        for k in range(L):
            c = geo.center_offsets[k][groups[k]]
            eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            orth = orth + torch.linalg.matrix_norm(c @ c.T - eye)
        out["orthogonality"] = orth
        total = total + center_orthogonality * orth
    out["penalty"] = total
    return out


class HierarchicalRegularizer(PenaltyCallback):
    """DH2L's hierarchical regularization 'H' on a hierarchical classifier layer, as a callback.

    Acts on every selected :class:`~lightning_hyper.nn.hierarchical.HierarchicalLinear` (by default
    the model's output layer), or, given ``hierarchy``, on a plain output layer whose rows are the
    classes (centers = group means of the rows, see
    :func:`~lightning_hyper.nn.hierarchical.mean_geometry`).

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
                classes = _check_labels(labels, geo.hierarchy.num_classes)
        return hierarchical_penalty(geo, classes, self.metric, self.weight, self.within_weight, self.between_weight,
                                    self.constraints, self.center_orthogonality, **self.metric_kwargs)


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    if labels.dtype.is_floating_point or labels.dim() > 1 and not (labels.dim() == 2 and labels.shape[1] == 1):
        raise ValueError(f"labels: expected integer class ids of shape (B,), got {tuple(labels.shape)} "
                         f"of dtype {labels.dtype}")
    labels = labels.flatten().long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: class ids must lie in [0, {num_classes - 1}] (the classes the hierarchy covers), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    return labels

