r"""Hierarchical-hyperspherical classifier layer (DH2L §3.1.1, eq. 1-3; spec ``dh2l.md`` §2-3).

A label hierarchy is a rooted tree: group levels ``0 .. L-1`` (level 0 = the top super-classes,
children of the implicit root) and the classes as leaves (level ``L``). Two levels (super-class ->
class, ``L = 1``) is the paper's case; deeper trees follow the paper's level recursion.

Parameterization (:class:`HierarchicalLinear`), with :math:`c_{root} = 0`:

* every group ``g`` has a center offset :math:`\Delta c_g` and an absolute center
  :math:`c_g = c_{p(g)} + \Delta c_g` (:math:`p` = parent);
* every class ``i`` of group ``g`` has a surface built on the parent center the same way,
  :math:`s_i = c_{p(g)} + \Delta s_i`;
* the class weight is surface minus center (eq. 1-3):
  :math:`w_i = s_i - c_g = \Delta s_i - \Delta c_g` (only the offsets relative to the parent
  matter; for two levels :math:`w_i = s_i - c_g`). Logits are :math:`x\cdot w_i`, no bias.

Center definitions (``center=``): ``"learned"`` (:math:`\Delta c_g` is a parameter, default),
``"mean"`` (the center is the mean of the group's class surfaces, :math:`\Delta c_g =
\mathrm{mean}_{i\in g}\Delta s_i`; higher levels of deeper trees stay learned) and ``"anchored"``
(footnote 3 of 000: :math:`\Delta c_g = \epsilon\, a_g` with :math:`|\epsilon| < 1` and
:math:`a_g` the group's own learned vector on its parent's sphere). Every parameter starts
Gaussian (spherically symmetric, §2.2).

Group vectors :math:`a_g` (``group_vectors=True``, always with ``"anchored"``) give each group
sphere the radius :math:`\|a_g\|` it has inside its parent's sphere, which the containment
constraints C1/C2 (:func:`containment_violations`) need.

The label tree (:class:`Hierarchy`), the geometry record, the constraint hinges and the penalty live in
:mod:`lightning_hyper.functional.hierarchy` (re-exported here); this module holds the layer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hyper.functional.hierarchy import (
    HIERARCHIES,
    Hierarchy,
    HierarchyGeometry,
    containment_violations,
    group_mean,
    group_radii,
    mean_geometry,
    register_hierarchy,
    safe_norm,
    sibling_margin_violations,
)
from lightning_hyper.nn.registry import register_head

__all__ = [
    "CENTER_MODES",
    "HIERARCHIES",
    "Hierarchy",
    "HierarchyGeometry",
    "HierarchicalLinear",
    "containment_violations",
    "group_radii",
    "mean_geometry",
    "register_hierarchy",
    "safe_norm",
    "sibling_margin_violations",
]

CENTER_MODES = ("learned", "mean", "anchored")

@register_head("hierarchical")
class HierarchicalLinear(nn.Module):
    r"""Classifier whose class weights are surface-minus-center vectors (DH2L eq. 1-3).

    Args:
        in_features: feature size d.
        num_classes: optional; checked against the hierarchy (which fixes it).
        hierarchy: super-class id of every class (two levels), or anything
            :meth:`Hierarchy.parse` accepts (adjacency matrices for deeper trees, a registered
            name such as ``"cifar100"``).
        center: ``"learned"`` (default), ``"mean"`` or ``"anchored"`` (see module docstring).
        epsilon: adjust factor of ``"anchored"`` centers, :math:`0 < |\epsilon| < 1`.
        group_vectors: learn a vector per group (its radius in the parent's sphere, used by
            constraints C1/C2); default: only with ``"anchored"``, where centers are built from them.
        init_std: std of the Gaussian initialization (default :math:`1/\sqrt{d}`).

    ``weight`` is the effective (num_classes, in_features) class-weight matrix (what energy
    callbacks see: ``hyperspherical_layer = True``); ``forward(x) = x @ weight.T`` (no bias).
    """

    hyperspherical_layer = True

    def __init__(self, in_features: int, num_classes: int | None = None, *, hierarchy: Any,
                 center: str = "learned", epsilon: float = 0.5, group_vectors: bool | None = None,
                 init_std: float | None = None) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        if center not in CENTER_MODES:
            raise ValueError(f"center={center!r} is not supported; accepted values: {list(CENTER_MODES)}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < abs(epsilon) < 1:
            raise ValueError(f"epsilon={epsilon!r} is not supported; accepted values: 0 < |epsilon| < 1")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float))
                                     or not 0 < init_std < math.inf):
            raise ValueError(f"init_std={init_std!r} is not supported; accepted values: None or a number > 0")
        h = Hierarchy.parse(hierarchy)
        if num_classes is not None and num_classes != h.num_classes:
            raise ValueError(f"hierarchy covers {h.num_classes} classes but num_classes={num_classes!r}; give the "
                             "super-class id of every class")
        if center == "mean":
            counts = torch.bincount(h.parent_tensor(h.num_group_levels), minlength=h.sizes[-2])
            single = (counts < 2).nonzero().flatten().tolist()
            if single:
                raise ValueError(f"center='mean' needs at least two classes per group (a single class would equal its "
                                 f"center and get a zero weight); group(s) {single[:10]} have one")
        if group_vectors is None:
            group_vectors = center == "anchored"
        if center == "anchored" and not group_vectors:
            raise ValueError("center='anchored' builds centers from the group vectors: group_vectors must be True")
        self.in_features = in_features
        self.num_classes = h.num_classes
        self.hierarchy = h
        self.center = center
        self.epsilon = float(epsilon)
        self.init_std = float(init_std) if init_std is not None else 1.0 / math.sqrt(in_features)
        L = h.num_group_levels
        self.surface = nn.Parameter(torch.empty(h.num_classes, in_features))
        learned_levels = [k for k in range(L) if center == "learned" or (center == "mean" and k < L - 1)]
        self.center_offset = nn.ParameterDict(
            {str(k): nn.Parameter(torch.empty(h.sizes[k], in_features)) for k in learned_levels})
        self.group_vector = nn.ParameterList(
            [nn.Parameter(torch.empty(h.sizes[k], in_features)) for k in range(L)] if group_vectors else [])
        for level in range(1, L + 1):
            self.register_buffer(f"_parents{level}", h.parent_tensor(level).clone(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian N(0, init_std^2) for every vector (spherically symmetric, DH2L §2.2)."""
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, self.init_std)

    def _parents(self, level: int) -> Tensor:
        return getattr(self, f"_parents{level}")

    # ------------------------------------------------------------------ geometry
    def geometry(self) -> HierarchyGeometry:
        """All class vectors, center offsets, absolute centers and group vectors (one top-down pass)."""
        h = self.hierarchy
        L = h.num_group_levels
        offsets: list[Tensor] = []
        centers: list[Tensor] = []
        for k in range(L):
            if self.center == "anchored":
                off = self.epsilon * self.group_vector[k]
            elif str(k) in self.center_offset:
                off = self.center_offset[str(k)]
            else:  # "mean" at the lowest group level
                off = group_mean(self.surface, self._parents(L), h.sizes[k])
            offsets.append(off)
            centers.append(off if k == 0 else centers[k - 1][self._parents(k)] + off)
        class_vectors = self.surface - offsets[-1][self._parents(L)]
        groups = list(self.group_vector) if len(self.group_vector) else None
        return HierarchyGeometry(h, class_vectors, offsets, centers, groups)

    @property
    def weight(self) -> Tensor:
        """Effective class weights (num_classes, in_features): :math:`w_i = s_i - c_{g(i)}`."""
        L = self.hierarchy.num_group_levels
        if self.center == "anchored":
            off = self.epsilon * self.group_vector[L - 1]
        elif str(L - 1) in self.center_offset:
            off = self.center_offset[str(L - 1)]
        else:
            off = group_mean(self.surface, self._parents(L), self.hierarchy.sizes[L - 1])
        return self.surface - off[self._parents(L)]

    def centers(self, level: int | None = None) -> Tensor:
        """Absolute centers of group level ``level`` (default: the lowest, the classes' groups)."""
        geo = self.geometry()
        return geo.centers[-1 if level is None else level]

    def surfaces(self) -> Tensor:
        """Absolute class surfaces :math:`s_i = c_{p(g(i))} + \\Delta s_i` (C, d)."""
        geo = self.geometry()
        L = self.hierarchy.num_group_levels
        if L == 1:
            return self.surface
        grand = geo.centers[L - 2][self._parents(L - 1)][self._parents(L)]
        return grand + self.surface

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HierarchicalLinear expects inputs with {self.in_features} features in the last "
                             f"dimension, got shape {tuple(x.shape)}")
        return x @ self.weight.T

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"groups={list(self.hierarchy.sizes[:-1])}, center={self.center!r}"
                + (f", epsilon={self.epsilon}" if self.center == "anchored" else ""))
