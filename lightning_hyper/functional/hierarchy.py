r"""DH2L's label hierarchy and hierarchical penalty (DH2L §3.1, eq. 1-7 and appendix; spec ``dh2l.md`` §2-3).

The one home of the DH2L math; :class:`~lightning_hyper.nn.hierarchical.HierarchicalLinear` (the layer) and
:class:`~lightning_hyper.callbacks.hierarchical.HierarchicalRegularizer` (the callback) only call it.

* :class:`Hierarchy`: a rooted label tree (group levels ``0 .. L-1``, the classes as leaves), parsed from
  super-class ids, adjacency matrices or a registered name (:data:`HIERARCHIES`).
* :class:`HierarchyGeometry`: every vector of a hierarchical layer at one moment; :func:`mean_geometry` builds it
  for a plain classifier weight (centers = group means).
* :func:`hierarchical_penalty`: the regularizer of one layer,

  .. math::
      R = \lambda_l\big(\lambda_p R_{l,p} + \lambda_c R_{l,c}\big) + \sum_k \lambda_k C_{k}
          + \lambda_o \sum_l \|\Delta C_l \Delta C_l^\top - I\|_F

  * :math:`R_{l,p}` (within groups): for each group with at least two classes present, the mean of the metric's
    minimized term over its ordered class pairs of :math:`w_i = s_i - c_g`, averaged over those groups (eq. 6;
    groups with one class present have no pair and are left out).
  * :math:`R_{l,c}` (between groups): per group level, the mean term over ordered pairs of distinct groups present
    of their center offsets :math:`\Delta c = w_c^{(l,l-1)}` (eq. 7); summed over group levels.
  * C1-C3: hinge penalties of :func:`containment_violations` and :func:`sibling_margin_violations`, averaged over
    the groups (C1, C2) or sibling pairs (C3) present, summed over levels. A group's sphere has its center
    :math:`c_g` and the mean radius of its children (:math:`\|w_i\|` for classes; for subgroups their group vector
    norm :math:`\|a_h\|`, or :math:`\|\Delta c_h\|` without group vectors); its outer sphere, inside the parent's,
    has radius :math:`\|a_g\|` (so C1/C2 need group vectors).
  * :math:`\lambda_o`: orthogonality of the centers (001 §3.1.2), the Frobenius norm computed by the library's one
    orthogonality penalty :func:`lightning_hyper.functional.orthogonal.orthogonality_penalty`.

  The pair metrics are those of :mod:`lightning_hyper.functional.discrete`.

Mini-batch hierarchy (the paper's default, §4.1): only the classes present (``classes``, e.g. the batch's labels
checked by :func:`present_classes`) and their ancestors enter; ``classes=None`` uses the whole hierarchy.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_hyper.functional.checks import argument_error, check_labels, check_number
from lightning_hyper.functional.discrete import canonical_metric, grouped_metric_energy, metric_energy
from lightning_hyper.functional.orthogonal import orthogonality_penalty

__all__ = [
    "CONSTRAINTS",
    "HIERARCHIES",
    "Hierarchy",
    "HierarchyGeometry",
    "PAIR_SCOPES",
    "containment_violations",
    "group_mean",
    "group_radii",
    "hierarchical_penalty",
    "mean_geometry",
    "parse_constraints",
    "present_classes",
    "register_hierarchy",
    "safe_norm",
    "sibling_margin_violations",
]

#: named hierarchies usable as ``hierarchy="name"`` (``lightning_hyper.data`` registers "cifar100")
HIERARCHIES: dict[str, Hierarchy] = {}


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
    def from_parents(cls, parents: Sequence[int] | Sequence[Sequence[int]]) -> Hierarchy:
        """``[g(0), ..., g(C-1)]`` (super-class id of each class: two levels), or a list of such
        lists, one per level from the top (each maps a level's nodes to the level above)."""
        if _nesting_depth(parents) == 1:
            return cls([parents])
        return cls(list(parents))

    @classmethod
    def from_adjacency(cls, matrices: Sequence[Any]) -> Hierarchy:
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
    def parse(cls, hierarchy: Any) -> Hierarchy:
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


def group_mean(values: Tensor, parents: Tensor, num_groups: int) -> Tensor:
    """Mean of the rows of ``values`` (N, d) per group id ``parents`` (N,) -> (num_groups, d); empty groups: 0."""
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
        child = group_mean(child, h.parent_tensor(level, rows.device), h.sizes[level - 1])
        centers[level - 1] = child
    offsets = [centers[0]] + [centers[k] - centers[k - 1][h.parent_tensor(k, rows.device)] for k in range(1, L)]
    class_vectors = rows - centers[-1][h.parent_tensor(L, rows.device)]
    return HierarchyGeometry(h, class_vectors, offsets, centers, None)


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


# ---------------------------------------------------------------------------- the penalty (eq. 4-7)
#: DH2L's constraints between levels (appendix): C1 radii, C2 containment, C3 sibling margin.
CONSTRAINTS = ("C1", "C2", "C3")
#: Which classes enter the penalty: those of the batch's labels (``"batch"``) or the whole hierarchy.
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
            argument_error("constraints", name, ", ".join(repr(c) for c in CONSTRAINTS),
                           fix="a list of names, or a dict name -> weight")
        out[name] = check_number(f"constraints[{name!r}]", w, low=0.0, low_inclusive=True)
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
        for k in range(L):  # ||ΔC ΔCᵀ − I||_F per level, the library's one orthogonality penalty
            orth = orth + orthogonality_penalty(geo.center_offsets[k][groups[k]], squared=False)
        out["orthogonality"] = orth
        total = total + center_orthogonality * orth
    out["penalty"] = total
    return out


def present_classes(labels: Tensor, hierarchy: Hierarchy) -> Tensor:
    """The batch's class ids (``(B,)`` or ``(B, 1)`` integers, each in ``[0, num_classes - 1]``) as a flat long
    tensor, for ``hierarchical_penalty(classes=...)``."""
    return check_labels(labels, hierarchy.num_classes, allow_column=True,
                        what="the classes the hierarchy covers", dtype_error=ValueError).long()
