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
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

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

#: named hierarchies usable as ``hierarchy="name"`` (``lightning_hyper.data`` registers "cifar100")
HIERARCHIES: dict[str, "Hierarchy"] = {}


def _nesting_depth(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.dim()
    if hasattr(obj, "ndim") and hasattr(obj, "tolist"):  # numpy
        return int(obj.ndim)
    if isinstance(obj, (list, tuple)):
        return 1 + (_nesting_depth(obj[0]) if len(obj) else 0)
    return 0


def _int_list(values: Any, what: str) -> list[int]:
    if isinstance(values, Tensor) or (hasattr(values, "tolist") and hasattr(values, "ndim")):
        if getattr(values, "dtype", None) is not None and str(values.dtype).startswith(("torch.float", "float")):
            raise TypeError(f"{what}: expected integer ids, got a float array")
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what}: expected integer ids, got {v!r} ({type(v).__name__})")
        out.append(int(v))
    return out


class Hierarchy:
    """A rooted label tree: ``parents[k][n]`` is the index, at group level ``k``, of the parent of
    node ``n`` of level ``k + 1``; the last entry maps the classes to their (lowest-level) groups.

    Build with :meth:`from_parents` (ids), :meth:`from_adjacency` (0/1 matrices) or :meth:`parse`.
    Group ids of every level must be ``0 .. G-1`` with no gap (every group has a child).
    """

    def __init__(self, parents: Sequence[Sequence[int]]) -> None:
        if len(parents) == 0:
            raise ValueError("hierarchy: needs at least one level of (group -> class) parents")
        levels = [tuple(_int_list(p, f"hierarchy level {k + 1} parents")) for k, p in enumerate(parents)]
        sizes = []
        for k, p in enumerate(levels):
            if len(p) == 0:
                raise ValueError(f"hierarchy: level {k + 1} has no node")
            if min(p) < 0:
                raise ValueError(f"hierarchy: level {k + 1} has a negative parent id ({min(p)})")
            n_parents = max(p) + 1
            missing = sorted(set(range(n_parents)) - set(p))
            if missing:
                raise ValueError(f"hierarchy: group ids of level {k} must be 0..{n_parents - 1} with every group "
                                 f"used; group(s) {missing[:10]} have no child")
            if k > 0 and n_parents != len(levels[k - 1]):
                raise ValueError(f"hierarchy: inconsistent levels: level {k} has {len(levels[k - 1])} nodes but "
                                 f"level {k + 1} refers to {n_parents} parents")
            sizes.append(n_parents)
        sizes.append(len(levels[-1]))
        self.parents: tuple[tuple[int, ...], ...] = tuple(levels)
        self.sizes: tuple[int, ...] = tuple(sizes)
        self._tensors: dict[tuple[int, str], Tensor] = {}  # parent-id tensors per (level, device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(cls, parents: Sequence[int] | Sequence[Sequence[int]]) -> "Hierarchy":
        """``[g(0), ..., g(C-1)]`` (super-class id of each class: two levels), or a list of such
        lists, one per level from the top (each maps a level's nodes to the level above)."""
        if _nesting_depth(parents) == 1:
            return cls([parents])
        return cls(list(parents))

    @classmethod
    def from_adjacency(cls, matrices: Sequence[Any]) -> "Hierarchy":
        r"""One 0/1 matrix :math:`P^{(l,l-1)}` of shape ``(|level l-1|, |level l|)`` per level,
        top first (the last one's columns are the classes); each column has exactly one 1."""
        parents = []
        for k, m in enumerate(matrices):
            p = torch.as_tensor(m)
            if p.dim() != 2:
                raise ValueError(f"hierarchy: adjacency matrix {k} must be 2-D (parents x children), got shape "
                                 f"{tuple(p.shape)}")
            if not bool(((p == 0) | (p == 1)).all()):
                raise ValueError(f"hierarchy: adjacency matrix {k} must hold only 0 and 1")
            counts = p.sum(dim=0)
            bad = (counts != 1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"hierarchy: inconsistent adjacency matrix {k}: child column(s) {bad[:10]} have "
                                 f"{[int(counts[b]) for b in bad[:10]]} parents (each child needs exactly one)")
            if k > 0 and p.shape[0] != len(parents[-1]):
                raise ValueError(f"hierarchy: inconsistent adjacency: matrix {k} has {p.shape[0]} parent rows but "
                                 f"matrix {k - 1} has {len(parents[-1])} child columns")
            empty = (p.sum(dim=1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"hierarchy: inconsistent adjacency matrix {k}: parent row(s) {empty[:10]} have no "
                                 "child")
            parents.append(p.argmax(dim=0).tolist())
        return cls(parents)

    @classmethod
    def parse(cls, hierarchy: Any) -> "Hierarchy":
        """Accepts a :class:`Hierarchy`; a registered name (:data:`HIERARCHIES`); a flat sequence
        of super-class ids (two levels); a 2-D 0/1 adjacency (groups x classes); a list of
        adjacency matrices (deeper trees, top first); or a dict ``{"parents": ...}`` /
        ``{"adjacency": ...}`` (YAML)."""
        if isinstance(hierarchy, Hierarchy):
            return hierarchy
        if isinstance(hierarchy, str):
            if hierarchy not in HIERARCHIES:
                raise ValueError(f"hierarchy={hierarchy!r} is not a registered name; registered: {sorted(HIERARCHIES)} "
                                 "(dataset hierarchies register when lightning_hyper.data is imported); or pass "
                                 "the super-class id of every class")
            return HIERARCHIES[hierarchy]
        if isinstance(hierarchy, dict):
            keys = set(hierarchy)
            if keys == {"parents"}:
                return cls.from_parents(hierarchy["parents"])
            if keys == {"adjacency"}:
                return cls.from_adjacency(hierarchy["adjacency"])
            raise ValueError(f"hierarchy: a dict needs exactly one key, 'parents' or 'adjacency'; got {sorted(keys)}")
        depth = _nesting_depth(hierarchy)
        if depth == 1:
            return cls([hierarchy])
        if depth == 2:
            return cls.from_adjacency([hierarchy])
        if depth == 3:
            return cls.from_adjacency(list(hierarchy))
        raise TypeError(f"hierarchy: expected super-class ids (a sequence of ints), an adjacency matrix, a list of "
                        f"adjacency matrices, a registered name or a Hierarchy; got {type(hierarchy).__name__}")

    # ------------------------------------------------------------------ queries
    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

    @property
    def num_group_levels(self) -> int:
        """L: the number of group levels above the classes (1 for super-class -> class)."""
        return len(self.parents)

    def parent_tensor(self, level: int, device: torch.device | None = None) -> Tensor:
        """Parent ids (at level ``level - 1``) of the nodes of ``level`` (1..L; L = classes)."""
        key = (level, str(device))
        cached = self._tensors.get(key)
        if cached is None:
            cached = self._tensors[key] = torch.tensor(self.parents[level - 1], dtype=torch.long, device=device)
        return cached

    def class_ancestors(self, classes: Tensor) -> list[Tensor]:
        """For class ids ``classes``: their group id at every group level, ``[level 0, ..., level L-1]``."""
        out = []
        node = classes
        for level in range(self.num_group_levels, 0, -1):
            node = self.parent_tensor(level, classes.device)[node]
            out.append(node)
        return out[::-1]

    def adjacency(self) -> list[Tensor]:
        """The 0/1 matrices :math:`P^{(l,l-1)}` (parents x children), top first."""
        mats = []
        for k, p in enumerate(self.parents):
            m = torch.zeros(self.sizes[k], len(p), dtype=torch.long)
            m[torch.tensor(p), torch.arange(len(p))] = 1
            mats.append(m)
        return mats

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hierarchy) and other.parents == self.parents

    def __hash__(self) -> int:
        return hash(self.parents)

    def __repr__(self) -> str:
        return f"Hierarchy(sizes={list(self.sizes)})"


def register_hierarchy(name: str, hierarchy: Any) -> Hierarchy:
    """Register a hierarchy (anything :meth:`Hierarchy.parse` accepts) under ``name``."""
    h = Hierarchy.parse(hierarchy)
    if name in HIERARCHIES and HIERARCHIES[name] != h:
        raise ValueError(f"hierarchy name {name!r} is already registered with a different tree")
    HIERARCHIES[name] = h
    return h


class HierarchyGeometry(NamedTuple):
    """Every vector of a hierarchical layer at one moment (index ``k`` = group level ``k``).

    ``class_vectors``: (C, d) class weights :math:`w_i = s_i - c_{g(i)}`; ``center_offsets[k]``:
    (G_k, d) :math:`\\Delta c` (= :math:`w_c^{(l,l-1)}`); ``centers[k]``: absolute centers;
    ``group_vectors``: ``[a_0, ..., a_{L-1}]`` or ``None``.
    """

    hierarchy: Hierarchy
    class_vectors: Tensor
    center_offsets: list[Tensor]
    centers: list[Tensor]
    group_vectors: list[Tensor] | None


def _group_mean(values: Tensor, parents: Tensor, num_groups: int) -> Tensor:
    sums = values.new_zeros(num_groups, values.shape[1]).index_add(0, parents, values)
    counts = torch.bincount(parents, minlength=num_groups).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]


def mean_geometry(rows: Tensor, hierarchy: Any) -> HierarchyGeometry:
    """Geometry of a plain classifier weight ``rows`` (C, d) under ``hierarchy``, with the ``"mean"``
    center definition at every level (a lowest-level center is the mean of its classes' rows, a
    higher one the mean of its children's centers); class vectors are rows minus their center."""
    h = Hierarchy.parse(hierarchy)
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != h.num_classes:
        raise ValueError(f"rows: expected a ({h.num_classes}, d) class-weight matrix for a hierarchy of "
                         f"{h.num_classes} classes, got {tuple(rows.shape) if isinstance(rows, Tensor) else rows!r}")
    L = h.num_group_levels
    centers: list[Tensor] = [rows] * L
    child = rows
    for level in range(L, 0, -1):
        child = _group_mean(child, h.parent_tensor(level, rows.device), h.sizes[level - 1])
        centers[level - 1] = child
    offsets = [centers[0]] + [centers[k] - centers[k - 1][h.parent_tensor(k, rows.device)] for k in range(1, L)]
    class_vectors = rows - centers[-1][h.parent_tensor(L, rows.device)]
    return HierarchyGeometry(h, class_vectors, offsets, centers, None)


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
                off = _group_mean(self.surface, self._parents(L), h.sizes[k])
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
            off = _group_mean(self.surface, self._parents(L), self.hierarchy.sizes[L - 1])
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


# ---------------------------------------------------------------------------- constraints (appendix)
def group_radii(child_radius: Tensor, child_parent: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Radius of every group's sphere = mean radius of its children; returns ``(radii, has_child)``
    (groups without a child get radius 0 and ``has_child = False``)."""
    sums = child_radius.new_zeros(num_groups).index_add(0, child_parent, child_radius)
    counts = torch.bincount(child_parent, minlength=num_groups)
    return sums / counts.clamp_min(1).to(sums.dtype), counts > 0


def containment_violations(inner_radius: Tensor, outer_radius: Tensor,
                           center_distance: Tensor) -> tuple[Tensor, Tensor]:
    r"""Hinge violations of C1 and C2 (DH2L appendix), elementwise per group:

    * C1 (inner radius <= outer radius): :math:`\mathrm{relu}(r^{(l)} - r^{(l-1)})`;
    * C2 (inner sphere inside the outer one): :math:`\mathrm{relu}(\|c^{(l-1)}-c^{(l)}\| + r^{(l)} - r^{(l-1)})`.
    """
    c1 = torch.relu(inner_radius - outer_radius)
    c2 = torch.relu(center_distance + inner_radius - outer_radius)
    return c1, c2


def sibling_margin_violations(centers: Tensor, radii: Tensor, parents: Tensor) -> Tensor:
    r"""C3 (positive margin between sibling spheres): :math:`\mathrm{relu}(r_a + r_b - \|c_a - c_b\|)`
    for every unordered pair ``a < b`` of rows with the same parent; shape ``(num_pairs,)``."""
    n = centers.shape[0]
    iu = torch.triu_indices(n, n, 1, device=centers.device)
    same = parents[iu[0]] == parents[iu[1]]
    a, b = iu[0][same], iu[1][same]
    return torch.relu(radii[a] + radii[b] - safe_norm(centers[a] - centers[b]))


def safe_norm(v: Tensor) -> Tensor:
    """Row norms with a finite (zero) gradient at the zero vector."""
    return torch.sqrt((v * v).sum(dim=-1).clamp_min(torch.finfo(v.dtype).tiny))
