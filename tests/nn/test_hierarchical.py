"""HierarchicalLinear, the Hierarchy tree and the sphere constraints (nn/hierarchical.py)."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_hyper.functional import as_neurons
from lightning_hyper.functional.neurons import has_neurons
from lightning_hyper.nn import HierarchicalLinear, Hierarchy, build_head, register_hierarchy
from lightning_hyper.nn.hierarchical import (
    HIERARCHIES,
    containment_violations,
    group_radii,
    mean_geometry,
    sibling_margin_violations,
)

TWO_LEVEL = [0, 0, 1, 1, 1, 2]
# three levels: 2 top groups -> 3 subgroups -> 6 classes
TOP = [[1, 1, 0], [0, 0, 1]]
SUB = [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]


# ----------------------------------------------------------------------------- Hierarchy
def test_parse_forms_agree():
    h = Hierarchy.parse(TWO_LEVEL)
    assert h.sizes == (3, 6) and h.num_classes == 6 and h.num_group_levels == 1
    adj = [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert Hierarchy.parse(adj) == h
    assert Hierarchy.parse(torch.tensor(TWO_LEVEL)) == h
    assert Hierarchy.parse({"parents": TWO_LEVEL}) == h
    assert Hierarchy.parse({"adjacency": [adj]}) == h
    assert [m.tolist() for m in h.adjacency()] == [adj]
    deep = Hierarchy.parse([TOP, SUB])
    assert deep.sizes == (2, 3, 6) and deep.parents == ((0, 0, 1), (0, 0, 1, 1, 2, 2))
    assert Hierarchy.from_parents([[0, 0, 1], [0, 0, 1, 1, 2, 2]]) == deep
    assert [m.tolist() for m in deep.adjacency()] == [TOP, SUB]
    anc = deep.class_ancestors(torch.tensor([5, 0, 3]))
    assert [a.tolist() for a in anc] == [[1, 0, 0], [2, 0, 1]]


def test_named_hierarchies():
    register_hierarchy("test-toy", TWO_LEVEL)
    try:
        assert Hierarchy.parse("test-toy") == Hierarchy.parse(TWO_LEVEL)
        with pytest.raises(ValueError, match="already registered"):
            register_hierarchy("test-toy", [0, 1])
        with pytest.raises(ValueError, match=r"hierarchy='nope' is not a registered name; registered: \[.*'test-toy'"):
            Hierarchy.parse("nope")
    finally:
        HIERARCHIES.pop("test-toy", None)


@pytest.mark.parametrize("bad,err,match", [
    ([0, 0, 2, 2], ValueError, r"group\(s\) \[1\] have no child"),
    ([0, -1], ValueError, "negative parent id"),
    ([0.0, 1.0], TypeError, "expected integer ids"),
    ([[1, 1, 0], [0, 1, 1]], ValueError,
     r"inconsistent adjacency matrix 0: child column\(s\) \[1\] have \[2\] parents"),
    ([[1, 0, 0], [0, 1, 0]], ValueError, r"child column\(s\) \[2\] have \[0\] parents"),
    ([[1, 1, 0], [0, 0, 1], [0, 0, 0]], ValueError, r"parent row\(s\) \[2\] have no child"),
    ([[[1, 1, 0], [0, 0, 1]], [[1, 0], [0, 1]]], ValueError, "matrix 1 has 2 parent rows but matrix 0 has 3"),
    ([[[[1]]]], TypeError, "hierarchy: expected super-class ids"),
    ({"parents": [0], "adjacency": [[1]]}, ValueError, "exactly one key"),
    ([[2, 0], [0, 1]], ValueError, "only 0 and 1"),
])
def test_bad_hierarchies(bad, err, match):
    with pytest.raises(err, match=match):
        Hierarchy.parse(bad)


def test_inconsistent_parent_levels():
    with pytest.raises(ValueError, match="level 1 has 3 nodes but level 2 refers to 2 parents"):
        Hierarchy.from_parents([[0, 0, 1], [0, 1, 1, 0]])


# ----------------------------------------------------------------------------- the layer
def test_two_level_weight_is_surface_minus_center():
    layer = HierarchicalLinear(5, 6, hierarchy=TWO_LEVEL)
    s, c = layer.surface.detach(), layer.center_offset["0"].detach()
    expected = torch.stack([s[i] - c[g] for i, g in enumerate(TWO_LEVEL)])
    torch.testing.assert_close(layer.weight.detach(), expected)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ expected.T)
    assert layer(torch.zeros(2, 5)).abs().max().item() == 0.0  # no bias
    assert has_neurons(layer) and as_neurons(layer).equal(layer.weight)
    geo = layer.geometry()
    torch.testing.assert_close(geo.class_vectors, layer.weight)
    torch.testing.assert_close(geo.centers[0], c)
    assert geo.group_vectors is None


def test_gradients_reach_surfaces_and_centers():
    layer = HierarchicalLinear(5, hierarchy=TWO_LEVEL)
    torch.nn.functional.cross_entropy(layer(torch.randn(8, 5)), torch.randint(0, 6, (8,))).backward()
    assert layer.surface.grad.abs().sum() > 0 and layer.center_offset["0"].grad.abs().sum() > 0
    # a center's gradient is minus the sum of its classes' weight gradients
    g = layer.surface.grad
    expected = -torch.stack([g[[i for i, p in enumerate(TWO_LEVEL) if p == k]].sum(0) for k in range(3)])
    torch.testing.assert_close(layer.center_offset["0"].grad, expected)


def test_mean_and_anchored_centers():
    groups = [0, 0, 1, 1, 1, 2, 2]
    mean = HierarchicalLinear(4, hierarchy=groups, center="mean")
    assert [n for n, _ in mean.named_parameters()] == ["surface"]
    w = mean.weight.detach()
    for k in range(3):
        members = [i for i, p in enumerate(groups) if p == k]
        torch.testing.assert_close(w[members].sum(0), torch.zeros(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(mean.centers()[k], mean.surface.detach()[members].mean(0))
    anchored = HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="anchored", epsilon=0.3)
    a = anchored.group_vector[0].detach()
    torch.testing.assert_close(anchored.centers().detach(), 0.3 * a)
    torch.testing.assert_close(anchored.weight.detach(), anchored.surface.detach() - 0.3 * a[torch.tensor(TWO_LEVEL)])


@pytest.mark.parametrize("center", ["learned", "anchored", "mean"])
def test_deeper_tree_follows_level_recursion(center):
    layer = HierarchicalLinear(3, hierarchy=[TOP, SUB], center=center)
    geo = layer.geometry()
    top, sub = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    # c^(l) = c^(l-1) + Δc^(l)
    torch.testing.assert_close(geo.centers[1], geo.centers[0][top] + geo.center_offsets[1])
    torch.testing.assert_close(geo.centers[0], geo.center_offsets[0])
    # eq. 1 = eq. 2: w = s - c (absolute) = Δs - Δc (offsets from the parent center)
    torch.testing.assert_close(layer.weight, layer.surfaces() - geo.centers[1][sub])
    torch.testing.assert_close(layer.weight, layer.surface - geo.center_offsets[1][sub])
    torch.testing.assert_close(geo.class_vectors, layer.weight)
    if center == "mean":
        torch.testing.assert_close(geo.centers[1], torch.stack([layer.surfaces()[sub == k].mean(0) for k in range(3)]))


def test_state_dict_round_trip_and_head_registry():
    layer = HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="anchored")
    other = build_head("hierarchical", 4, 6, hierarchy=TWO_LEVEL, center="anchored")
    assert isinstance(other, HierarchicalLinear)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.weight, layer.weight)


def test_gaussian_init():
    layer = HierarchicalLinear(400, hierarchy=[i // 10 for i in range(200)])
    assert layer.surface.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.05)
    assert abs(layer.surface.mean().item()) < 0.01
    assert HierarchicalLinear(4, hierarchy=[0, 1], init_std=2.0).surface.std().item() > 0.5


def test_layer_errors():
    with pytest.raises(ValueError, match="hierarchy covers 6 classes but num_classes=10"):
        HierarchicalLinear(4, 10, hierarchy=TWO_LEVEL)
    with pytest.raises(ValueError, match=r"center='median' is not supported; accepted values: \['learned', 'mean', "
                                         r"'anchored'\]"):
        HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="median")
    with pytest.raises(ValueError, match=r"center='mean' needs at least two classes per group.*group\(s\) \[2\]"):
        HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="mean")  # group 2 has one class
    with pytest.raises(ValueError, match="epsilon=1.5"):
        HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="anchored", epsilon=1.5)
    with pytest.raises(ValueError, match="group_vectors must be True"):
        HierarchicalLinear(4, hierarchy=TWO_LEVEL, center="anchored", group_vectors=False)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        HierarchicalLinear(0, hierarchy=TWO_LEVEL)
    with pytest.raises(TypeError):
        HierarchicalLinear(4, 6)  # hierarchy is required
    with pytest.raises(ValueError, match=r"expects inputs with 4 features.*\(2, 5\)"):
        HierarchicalLinear(4, hierarchy=TWO_LEVEL)(torch.randn(2, 5))


def test_mean_geometry_of_plain_rows():
    rows = torch.randn(6, 3)
    geo = mean_geometry(rows, TWO_LEVEL)
    means = torch.stack([rows[[0, 1]].mean(0), rows[[2, 3, 4]].mean(0), rows[5]])
    torch.testing.assert_close(geo.centers[0], means)
    torch.testing.assert_close(geo.class_vectors, rows - means[torch.tensor(TWO_LEVEL)])
    with pytest.raises(ValueError, match=r"rows: expected a \(6, d\) class-weight matrix"):
        mean_geometry(torch.randn(5, 3), TWO_LEVEL)


# ----------------------------------------------------------------------------- constraints
def test_containment_zero_when_satisfied_positive_when_violated():
    inner = torch.tensor([1.0, 1.0, 3.0, 1.0])
    outer = torch.tensor([2.0, 2.0, 2.0, 2.0])
    dist = torch.tensor([0.5, 1.0, 0.0, 1.5])
    c1, c2 = containment_violations(inner, outer, dist)
    assert c1.tolist() == [0.0, 0.0, 1.0, 0.0]  # C1: inner radius 3 > outer 2 violated by 1
    assert c2.tolist() == [0.0, 0.0, 1.0, 0.5]  # C2: 0.5+1 <= 2 ok, 1+1 = 2 boundary ok, 0+3-2, 1.5+1-2


def test_sibling_margin():
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    radii = torch.tensor([1.0, 1.0, 1.0, 1.0])
    parents = torch.tensor([0, 0, 0, 1])  # the last group has no sibling
    v = sibling_margin_violations(centers, radii, parents)
    # pairs (0,1): dist 3 >= 2 ok; (0,2): dist 1 < 2 -> 1; (1,2): dist sqrt(10) > 2 ok
    torch.testing.assert_close(v, torch.tensor([0.0, 1.0, 0.0]))
    radii, has = group_radii(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert radii.tolist() == [2.0, 0.0, 5.0] and has.tolist() == [True, False, True]
