"""Hostile inputs for the functional core, the margin heads, OPT and DH2L (issue 8, guarantee 4).

Property-based (hypothesis) tests. Inputs: shapes from 1x1 to wide / tall, float32 and float64,
all-zero rows, duplicated and antipodal rows, rows of norm 1e-30 and 1e30, NaN / Inf entries,
d = 1, N = 1. Every case must either return finite values with finite gradients or raise a
``ValueError`` that names the offending argument -- never a silent NaN. Where the library's
contract says which of the two must happen (e.g. NaN entries must raise, rows of norm 1e30 must
work because the energy is scale invariant), the test checks exactly that, and several
properties also check values (scale / permutation invariance, range, orthogonality).

A last group checks the memory bound: no N x N x d tensor is ever allocated (the peak resident
memory of an N = 2000, d = 64 energy with its gradient stays far below N*N*d*4 bytes).

``derandomize=True`` keeps the example sequence fixed, so CI runs are reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_hyper.functional import (
    as_neurons,
    compressive_energy,
    group_energy,
    grouped_metric_energy,
    hyperspherical_energy,
    metric_energy,
    metric_energy_from_labels,
    output_energy_from_labels,
    pairwise_angles,
    project_neurons,
    projected_energies,
    psi,
)
from lightning_hyper.functional.discrete import METRIC_DIRECTIONS, METRICS
from lightning_hyper.functional.margin import additive_angular_margin, additive_cosine_margin, chebyshev_cos_m
from lightning_hyper.functional.orthogonal import ORTHOGONAL_MAPS, orthogonality_error, orthogonalize
from lightning_hyper.nn import HEADS, HierarchicalLinear, Hierarchy, build_head
from lightning_hyper.nn.opt import OPT_METHODS, apply_opt, get_opt
from tests.memory import peak_rss_delta

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = (torch.float32, torch.float64)
ROW_EDITS = ("zero", "duplicate", "negate", "tiny", "huge", "small_ok", "nan", "inf")
TINY, HUGE = 1e-30, 1e30


# ------------------------------------------------------------------------------------ strategies
@dataclass
class Hostile:
    """A generated (N, d) matrix and what is wrong with it."""

    x: torch.Tensor
    edits: tuple[str, ...]

    @property
    def nonfinite(self) -> bool:
        return not bool(torch.isfinite(self.x).all())

    def row_norms(self) -> torch.Tensor:
        """Exact row norms (float64, overflow-free by pre-scaling)."""
        x = self.x.double()
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        return (x / amax).norm(dim=-1) * amax.squeeze(-1)

    def small(self, min_norm: float = 1e-6) -> torch.Tensor:
        return self.row_norms() < min_norm

    def zero_rows(self) -> torch.Tensor:
        return (self.x == 0).all(dim=-1)


def _shape(draw, max_n: int, max_d: int) -> tuple[int, int]:
    kind = draw(st.sampled_from(["1x1", "column", "row", "tall", "wide", "square", "any"]))
    if kind == "1x1":
        return 1, 1
    if kind == "column":  # d = 1: every neuron is +-1
        return draw(st.integers(1, max_n)), 1
    if kind == "row":  # N = 1: no pair
        return 1, draw(st.integers(1, max_d))
    if kind == "tall":
        return draw(st.integers(max_n // 2, max_n)), draw(st.integers(1, 3))
    if kind == "wide":
        return draw(st.integers(2, 4)), draw(st.integers(max_d // 2, max_d))
    if kind == "square":
        k = draw(st.integers(1, min(max_n, max_d)))
        return k, k
    return draw(st.integers(1, max_n)), draw(st.integers(1, max_d))


@st.composite
def hostile_matrices(draw, max_n: int = 20, max_d: int = 24, edits: tuple[str, ...] = ROW_EDITS,
                     max_edits: int = 3) -> Hostile:
    n, d = _shape(draw, max_n, max_d)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x * draw(st.sampled_from([1.0, 1e-3, 1e3]))  # a global scale never matters
    done = []
    for kind, i, j in draw(st.lists(st.tuples(st.sampled_from(edits), st.integers(0, n - 1), st.integers(0, n - 1)),
                                    max_size=max_edits)):
        row = x[i] / x[i].norm().clamp_min(1e-300)
        if kind == "zero":
            x[i] = 0.0
        elif kind == "duplicate":
            x[i] = x[j]
        elif kind == "negate":
            x[i] = -x[j]
        elif kind == "tiny":
            x[i] = row * TINY
        elif kind == "huge":
            x[i] = row * HUGE
        elif kind == "small_ok":  # small but above min_norm = 1e-6
            x[i] = row * 1e-5
        elif kind == "nan":
            x[i, j % d] = math.nan
        elif kind == "inf":
            x[i, j % d] = math.inf if j % 2 else -math.inf
        done.append(kind)
    return Hostile(x.to(dtype), tuple(done))


def _value_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    leaf = x.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return value.detach(), grad


def _assert_finite(value: torch.Tensor, grad: torch.Tensor | None, what: str) -> None:
    assert bool(torch.isfinite(value).all()), f"{what}: non-finite value {value}"
    assert grad is None or bool(torch.isfinite(grad).all()), f"{what}: non-finite gradient"


def _raises_naming(arg: str, fn, *args, **kwargs) -> ValueError:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert arg in str(info.value), f"error does not name {arg!r}: {info.value}"
    return info.value


def _finite_or_named_error(arg: str, fn, x: torch.Tensor, what: str) -> bool:
    """Either finite value + gradient (True) or a ValueError naming ``arg`` (False)."""
    try:
        value, grad = _value_and_grad(fn, x)
    except ValueError as err:
        assert arg in str(err), f"{what}: error does not name {arg!r}: {err}"
        return False
    _assert_finite(value, grad, what)
    return True


# ------------------------------------------------------------------------------- energy core
@settings(max_examples=120, **SETTINGS)
@given(m=hostile_matrices(), s=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
       metric=st.sampled_from(["euclidean", "angular"]), half_space=st.booleans(),
       angle_unit=st.sampled_from(["radian", "pi"]), chunk=st.sampled_from([None, 1, 3]),
       zero_norm=st.sampled_from(["error", "exclude"]))
def test_hyperspherical_energy_finite_or_clear_error(m, s, metric, half_space, angle_unit, chunk, zero_norm):
    kw = dict(s=s, metric=metric, half_space=half_space, angle_unit=angle_unit, chunk_size=chunk, zero_norm=zero_norm)
    small = m.small()
    if m.nonfinite or (zero_norm == "error" and bool(small.any())):
        err = _raises_naming("neurons", hyperspherical_energy, m.x, **kw)
        assert ("NaN or Inf" in str(err)) == m.nonfinite
        return
    value, grad = _value_and_grad(lambda x: hyperspherical_energy(x, **kw), m.x)
    _assert_finite(value, grad, f"energy {kw} edits={m.edits}")
    assert value.shape == () and value.dtype == (torch.float64 if m.x.dtype == torch.float64 else torch.float32)
    assert bool((grad[small] == 0).all()), "excluded rows must get a zero gradient"
    if m.x.dtype == torch.float64:  # scale invariance: only the directions of the kept rows count
        keep = m.x[~small]
        unit = keep / m.row_norms()[~small, None]
        assert torch.allclose(value, hyperspherical_energy(unit, **kw), rtol=1e-9, atol=0)


@settings(max_examples=40, **SETTINGS)
@given(m=hostile_matrices(max_n=10, max_d=8, edits=("huge", "small_ok")),  # (duplicates: gradient = 1e9 x rounding)
       s=st.sampled_from([0.0, 1.0, 2.0]), metric=st.sampled_from(["euclidean", "angular"]), half_space=st.booleans(),
       chunk=st.sampled_from([1, 2, 4]), batch=st.integers(1, 3))
def test_energy_chunked_and_batched_paths_agree_with_one_block(m, s, metric, half_space, chunk, batch):
    """Row blocks (custom backward recomputing the upper triangle) = one block, values and gradients."""
    kw = dict(s=s, metric=metric, half_space=half_space)
    x = m.x.double()
    ref_v, ref_g = _value_and_grad(lambda t: hyperspherical_energy(t, **kw), x)
    v, g = _value_and_grad(lambda t: hyperspherical_energy(t, chunk_size=chunk, **kw), x)
    _assert_finite(v, g, "chunked energy")
    assert torch.allclose(v, ref_v, rtol=1e-10, atol=0)
    assert torch.allclose(g, ref_g, rtol=1e-7, atol=1e-12 * float(ref_g.abs().max()))
    stacked = x.unsqueeze(0).repeat(batch, 1, 1)
    bv, bg = _value_and_grad(lambda t: hyperspherical_energy(t, chunk_size=chunk, **kw), stacked)
    assert bv.shape == (batch,) and torch.allclose(bv, ref_v.expand(batch), rtol=1e-10, atol=0)
    assert torch.allclose(bg, ref_g.expand_as(bg), rtol=1e-7, atol=1e-12 * float(ref_g.abs().max()))


@settings(max_examples=60, **SETTINGS)
@given(m=hostile_matrices(), degrees=st.booleans())
def test_pairwise_angles_finite_or_clear_error(m, degrees):
    if m.nonfinite or bool(m.small().any()):
        _raises_naming("neurons", pairwise_angles, m.x, degrees=degrees)
        return
    ang, grad = _value_and_grad(lambda x: pairwise_angles(x, degrees=degrees), m.x)
    _assert_finite(ang, grad, f"pairwise_angles edits={m.edits}")
    n = m.x.shape[0]
    top = 180.0 if degrees else math.pi
    assert ang.shape == (n * (n - 1) // 2,)
    assert bool((ang >= 0).all()) and bool((ang <= top * (1 + 1e-6)).all())


def test_pairwise_angles_rejects_batches():
    _raises_naming("neurons", pairwise_angles, torch.randn(2, 3, 4))


@settings(max_examples=60, **SETTINGS)
@given(m=hostile_matrices(max_d=12), k=st.integers(1, 5), c=st.integers(1, 3),
       aggregate=st.sampled_from(["mean", "max"]), half_space=st.booleans(), seed=st.integers(0, 1000))
def test_compressive_energy_finite_or_clear_error(m, k, c, aggregate, half_space, seed):
    d = m.x.shape[1]
    proj = torch.randn(c, k, d, generator=torch.Generator().manual_seed(seed), dtype=m.x.dtype)
    fn = lambda x: compressive_energy(x, proj, aggregate=aggregate, half_space=half_space)  # noqa: E731
    if m.nonfinite or bool(m.small().any()):
        _raises_naming("neurons", fn, m.x)
        return
    # a small row may project below min_norm = 1e-6: then a named error, else finite
    if not _finite_or_named_error("neurons", fn, m.x, f"compressive edits={m.edits}"):
        assert float(project_neurons(m.x.double(), proj.double()).norm(dim=-1).min()) < 1.01e-6
        return
    # projected energies are per projection; the aggregate is their mean / max
    value = fn(m.x)
    per = projected_energies(m.x, proj, half_space=half_space)
    assert per.shape == (c,)
    ref = per.mean() if aggregate == "mean" else per.max()
    assert torch.allclose(value, ref, rtol=1e-6, atol=0)


def test_compressive_energy_rejects_mismatched_projections():
    _raises_naming("projections", compressive_energy, torch.randn(5, 4), torch.randn(2, 3, 5))
    _raises_naming("projections", compressive_energy, torch.randn(5, 4), torch.randn(4))


@settings(max_examples=40, **SETTINGS)
@given(m=hostile_matrices(max_d=12, edits=("zero", "duplicate", "negate", "huge", "nan", "inf")),
       width=st.integers(1, 12), aggregate=st.sampled_from(["mean", "max"]))
def test_group_energy_finite_or_clear_error(m, width, aggregate):
    fn = lambda x: group_energy(x, group_width=width, aggregate=aggregate)  # noqa: E731
    if m.nonfinite or bool(m.zero_rows().any()):
        _raises_naming("neurons", fn, m.x)
        return
    n, d = m.x.shape
    groups = -(-d // width)
    padded = torch.nn.functional.pad(m.x, (0, groups * width - d)).reshape(n, groups, width)
    if bool((padded == 0).all(-1).any()):
        # a non-zero row may still have an all-zero group (e.g. d=1 padded): finite or named error
        _finite_or_named_error("neurons", fn, m.x, f"group_energy edits={m.edits}")
        return
    value, grad = _value_and_grad(fn, m.x)  # every group has a direction: no error allowed
    _assert_finite(value, grad, f"group_energy edits={m.edits}")


@settings(max_examples=50, **SETTINGS)
@given(m=hostile_matrices(max_n=10, max_d=8), labels=st.lists(st.integers(-2, 12), max_size=8),
       unique=st.booleans(), metric=st.sampled_from(["euclidean", "angular"]))
def test_output_energy_from_labels_finite_or_clear_error(m, labels, unique, metric):
    n = m.x.shape[0]
    y = torch.tensor(labels, dtype=torch.long)
    fn = lambda x: output_energy_from_labels(x, y, metric=metric, unique=unique)  # noqa: E731
    if m.nonfinite or bool(m.small().any()):
        _raises_naming("weight", fn, m.x)
        return
    if any(not 0 <= v < n for v in labels):
        _raises_naming("labels", fn, m.x)
        return
    value, grad = _value_and_grad(fn, m.x)
    _assert_finite(value, grad, f"output energy edits={m.edits}")
    if not labels or n < 2:
        assert float(value) == 0.0


# ------------------------------------------------------------------------------ DH2L metrics
@settings(max_examples=120, **SETTINGS)
@given(m=hostile_matrices(max_n=12, max_d=10), metric=st.sampled_from(METRICS),
       discrete=st.sampled_from(["binary", "ternary"]), gm=st.sampled_from(["product", "sqrt"]),
       reduction=st.sampled_from(["mean", "sum"]))
def test_dh2l_metric_energy_finite_or_clear_error(m, metric, discrete, gm, reduction):
    energy_kind = METRIC_DIRECTIONS[metric] == "energy" and metric != "cosine"
    kw = {} if energy_kind else dict(discrete=discrete, gm=gm)
    fn = lambda x: metric_energy(x, metric, reduction=reduction, **kw)  # noqa: E731
    # zero rows have no direction; the two MHE baselines also reject rows below min_norm = 1e-6
    if m.nonfinite or bool(m.zero_rows().any()) or (energy_kind and bool(m.small().any())):
        _raises_naming("neurons", fn, m.x)
        return
    value, grad = _value_and_grad(fn, m.x)
    _assert_finite(value, grad, f"metric_energy {metric} edits={m.edits}")
    if METRIC_DIRECTIONS[metric] != "energy" and reduction == "mean":  # DH2L terms lie in [0, 1]
        assert -1e-6 <= float(value) <= 1 + 1e-6


@settings(max_examples=50, **SETTINGS)
@given(m=hostile_matrices(max_n=10, max_d=8, edits=("zero", "duplicate", "tiny", "huge", "nan")),
       metric=st.sampled_from(METRICS), labels=st.lists(st.integers(-1, 11), max_size=6),
       groups=st.lists(st.integers(0, 3), min_size=10, max_size=10))
def test_dh2l_label_and_group_forms_finite_or_clear_error(m, metric, labels, groups):
    n = m.x.shape[0]
    bad_rows = m.nonfinite or bool(m.zero_rows().any())
    y = torch.tensor(labels, dtype=torch.long)
    fn = lambda x: metric_energy_from_labels(x, y, metric)  # noqa: E731
    if bad_rows:
        _raises_naming("weight", fn, m.x)
    elif any(not 0 <= v < n for v in labels):
        _raises_naming("labels", fn, m.x)
    else:
        _assert_finite(*_value_and_grad(fn, m.x), f"metric_energy_from_labels {metric}")
    g = torch.tensor(groups[:n])
    fn = lambda x: grouped_metric_energy(x, g, metric)  # noqa: E731
    if bad_rows:
        _raises_naming("neurons", fn, m.x)
    else:
        _assert_finite(*_value_and_grad(fn, m.x), f"grouped_metric_energy {metric}")
    _raises_naming("groups", grouped_metric_energy, m.x.nan_to_num(1.0) + 1.0, torch.zeros(n + 1, dtype=torch.long),
                   metric)


# ------------------------------------------------------------------------------------ neurons
@settings(max_examples=60, **SETTINGS)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=5))
def test_as_neurons_tensor_shapes(shape):
    w = torch.randn(*shape) if shape else torch.randn(())
    if len(shape) < 2:
        _raises_naming("weight", as_neurons, w)
        return
    out = as_neurons(w)
    assert out.shape == (shape[0], math.prod(shape[1:]))
    if out.numel():
        assert out.data_ptr() == w.data_ptr() and torch.equal(out, w.reshape(shape[0], -1))


@settings(max_examples=40, **SETTINGS)
@given(dims=st.integers(1, 3), groups=st.integers(1, 3), per_in=st.integers(1, 3), per_out=st.integers(1, 3),
       k=st.integers(1, 3), transposed=st.booleans())
def test_as_neurons_conv_layers_match_a_reference_loop(dims, groups, per_in, per_out, k, transposed):
    cin, cout = groups * per_in, groups * per_out
    if transposed:
        layer = getattr(nn, f"ConvTranspose{dims}d")(cin, cout, k, groups=groups)
        w = layer.weight  # (in, out/groups, *k)
        ref = torch.stack([w[(o // per_out) * per_in:(o // per_out + 1) * per_in, o % per_out].reshape(-1)
                           for o in range(cout)])
    else:
        layer = getattr(nn, f"Conv{dims}d")(cin, cout, k, groups=groups)
        ref = layer.weight.reshape(cout, -1)
    out = as_neurons(layer)
    assert out.shape == (cout, per_in * k ** dims)
    assert torch.equal(out, ref)


def test_as_neurons_rejects_non_tensors():
    with pytest.raises(TypeError, match="weight"):
        as_neurons([[1.0, 2.0]])
    with pytest.raises(TypeError, match="weight"):
        as_neurons(nn.ReLU())


# ------------------------------------------------------------------------------------- margins
_COS = st.one_of(st.floats(-1.0, 1.0), st.sampled_from([-1.0, 1.0, 0.0, 1 + 1e-6, -1 - 1e-6, 1 + 1e-3]),
                 st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=80, **SETTINGS)
@given(values=st.lists(_COS, min_size=1, max_size=8), m=st.integers(1, 6), dtype=st.sampled_from(DTYPES))
def test_psi_finite_or_clear_error(values, m, dtype):
    cos = torch.tensor(values, dtype=dtype)
    if not bool(torch.isfinite(cos).all()):
        _raises_naming("cos", psi, cos, m)
        return
    value, grad = _value_and_grad(lambda c: psi(c, m), cos)
    _assert_finite(value, grad, f"psi m={m}")
    c = cos.clamp(-1, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert bool((value <= c + tol).all()) and bool((value >= 1 - 2 * m - tol).all()) and bool((value <= 1 + tol).all())
    order = torch.argsort(c)  # psi is non-decreasing in cos (decreasing in theta)
    assert bool((value[order].diff() >= -tol * 10 * m * m).all())
    assert bool((grad.abs() <= m * m * (1 + tol)).all())  # |psi'| = m |U_{m-1}| <= m^2


@settings(max_examples=60, **SETTINGS)
@given(values=st.lists(_COS, min_size=1, max_size=8), margin=st.floats(0.0, 3.0), m=st.integers(1, 6))
def test_additive_margins_and_chebyshev_finite_or_clear_error(values, margin, m):
    cos = torch.tensor(values, dtype=torch.float64)
    for name, fn in (("additive_cosine_margin", lambda c: additive_cosine_margin(c, margin)),
                     ("additive_angular_margin", lambda c: additive_angular_margin(c, margin)),
                     ("chebyshev_cos_m", lambda c: chebyshev_cos_m(c, m))):
        if not bool(torch.isfinite(cos).all()):
            _raises_naming("cos", fn, cos)
        else:
            _assert_finite(*_value_and_grad(fn, cos), name)


_MARGIN_HEADS = sorted(name for name in HEADS if name not in ("hierarchical",))


@settings(max_examples=80, **SETTINGS)
@given(name=st.sampled_from(_MARGIN_HEADS), batch=st.integers(0, 5), d=st.integers(1, 6), classes=st.integers(1, 5),
       labels=st.lists(st.integers(-2, 6), min_size=5, max_size=5), zero_rows=st.lists(st.integers(0, 4), max_size=2),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), train=st.booleans(), seed=st.integers(0, 1000))
def test_margin_heads_labels_and_empty_batches(name, batch, d, classes, labels, zero_rows, scale, train, seed):
    torch.manual_seed(seed)
    head = build_head(name, d, classes)
    head.train(train)
    x = torch.randn(batch, d, dtype=torch.float64) * scale
    for r in zero_rows:
        if r < batch:
            x[r] = 0.0
    head = head.double()
    y = torch.tensor(labels[:batch], dtype=torch.long)
    if any(not 0 <= v < classes for v in labels[:batch]):
        _raises_naming("labels", head, x, y)
        return
    leaf = x.clone().requires_grad_(True)
    logits = head(leaf, y) if batch or getattr(head, "needs_labels", False) else head(leaf)
    assert logits.shape == (batch, classes)
    if batch == 0:
        return  # empty batch: empty logits, nothing else to check
    _assert_finite(logits.detach(), None, f"{name} logits")
    loss = nn.functional.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [leaf, *[p for p in head.parameters() if p.requires_grad]], allow_unused=True)
    for g in grads:
        assert g is None or bool(torch.isfinite(g).all()), f"{name}: non-finite gradient"


@pytest.mark.parametrize("name", _MARGIN_HEADS)
def test_margin_heads_reject_mismatched_labels(name):
    head = build_head(name, 4, 3)
    x = torch.randn(2, 4)
    _raises_naming("labels", head, x, torch.tensor([0, 1, 2]))  # wrong length
    with pytest.raises((TypeError, ValueError), match="labels"):
        head(x, torch.tensor([0.0, 1.0]))  # float labels
    with pytest.raises(ValueError, match="features|in_features"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------- OPT
_P_KINDS = ("random", "zeros", "ones", "duplicate_rows", "tiny", "huge", "nan", "inf", "identity")


@st.composite
def square_parameters(draw):
    d = draw(st.integers(1, 6))
    batch = draw(st.sampled_from([(), (2,)]))
    kind = draw(st.sampled_from(_P_KINDS))
    dtype = draw(st.sampled_from(DTYPES))
    P = torch.randn(*batch, d, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 10_000))),
                    dtype=torch.float64)
    if kind == "zeros":
        P.zero_()
    elif kind == "ones":
        P.fill_(1.0)
    elif kind == "duplicate_rows" and d > 1:
        P[..., 1, :] = P[..., 0, :]
    elif kind == "tiny":
        P *= TINY
    elif kind == "huge":
        P *= HUGE
    elif kind == "nan":
        P[..., 0, d - 1] = math.nan
    elif kind == "inf":
        P[..., d - 1, 0] = math.inf
    elif kind == "identity":
        P = torch.eye(d, dtype=torch.float64).expand(*batch, d, d).clone()
    return P.to(dtype), kind


@settings(max_examples=150, **SETTINGS)
@given(pk=square_parameters(), method=st.sampled_from(sorted(ORTHOGONAL_MAPS)))
def test_orthogonal_maps_finite_or_clear_error(pk, method):
    P, kind = pk
    # cayley / matrix_exp only read the strict upper triangle of P (S = triu(P, 1) - triu(P, 1)^T)
    used = P.triu(1) if method in ("cayley", "matrix_exp") else P
    if not bool(torch.isfinite(used).all()):
        _raises_naming("P", orthogonalize, P, method)
        return
    if kind == "huge" and method in ("cayley", "matrix_exp") and P.shape[-1] > 1:  # scale-dependent: refused
        _raises_naming("P", orthogonalize, P, method)
        return
    try:
        R, grad = _value_and_grad(lambda p: orthogonalize(p, method), P)
    except ValueError as err:
        # only a (numerically) rank-deficient P may be refused, by the maps that need full rank
        assert ("P" in str(err) and method in ("gram_schmidt", "householder")
                and kind in ("zeros", "ones", "duplicate_rows")), err
        with torch.no_grad():  # without a gradient the forward still works
            R = orthogonalize(P, method)
        assert float(orthogonality_error(R)) < (1e-4 if P.dtype == torch.float32 else 1e-10)
        return
    _assert_finite(R, grad, f"{method} on {kind}")
    assert R.shape == P.shape
    assert float(orthogonality_error(R)) < (1e-4 if P.dtype == torch.float32 else 1e-10)


@settings(max_examples=30, **SETTINGS)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), lead=st.sampled_from([(), (2,)]),
       method=st.sampled_from(sorted(ORTHOGONAL_MAPS)))
def test_orthogonal_maps_reject_non_square(rows, cols, lead, method):
    P = torch.randn(*lead, rows, cols)
    if rows == cols:
        assert orthogonalize(P, method).shape == P.shape
    else:
        err = _raises_naming("P", orthogonalize, P, method)
        assert "square" in str(err)
    _raises_naming("P", orthogonalize, torch.randn(3), method)


@settings(max_examples=40, **SETTINGS)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 6), method=st.sampled_from(OPT_METHODS),
       conv=st.booleans(), seed=st.integers(0, 1000))
def test_apply_opt_rectangular_layers(out_f, in_f, method, conv, seed):
    """OPT on wide (n < d), tall (n > d) and 1 x 1 layers: W = R V keeps every angle and norm."""
    torch.manual_seed(seed)
    layer = nn.Conv2d(in_f, out_f, 2) if conv else nn.Linear(in_f, out_f)
    v = as_neurons(layer).detach().clone().double()
    model = nn.Sequential(layer)
    apply_opt(model, method, output_layer="none", seed=seed)
    param = get_opt(layer)
    assert param is not None and tuple(layer.weight.shape) == tuple(param.weight_shape)
    w = as_neurons(layer)
    assert w.shape == v.shape and bool(torch.isfinite(w).all())
    if method not in ("relaxed", "unconstrained"):  # R orthogonal: Gram matrix of the neurons unchanged
        gram = w.double() @ w.double().T
        assert torch.allclose(gram, v @ v.T, atol=1e-4 * max(1.0, float((v @ v.T).abs().max())))
    x = torch.randn(3, in_f, 4, 4) if conv else torch.randn(3, in_f)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [p for p in layer.parameters() if p.requires_grad])
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_apply_opt_bad_block_and_subset_sizes_are_named():
    _raises_naming("blocks", apply_opt, nn.Sequential(nn.Linear(5, 3)), "cayley", output_layer="none", blocks=2)
    _raises_naming("sopt_dim", apply_opt, nn.Sequential(nn.Linear(5, 3)), "cayley", output_layer="none",
                   sopt=True, sopt_dim=0)
    _raises_naming("method", apply_opt, nn.Sequential(nn.Linear(5, 3)), "qr", output_layer="none")


# ---------------------------------------------------------------------------------------- DH2L
@st.composite
def parent_lists(draw):
    groups = draw(st.integers(1, 4))
    parents = draw(st.lists(st.integers(0, groups - 1), min_size=1, max_size=8))
    drop = draw(st.sampled_from(["none", "entry", "gap", "negative", "short"]))
    if drop == "entry" and len(parents) > 1:
        parents = parents[:-1]  # one class has no parent: the layer asked for more classes
    elif drop == "gap":
        parents = [p + 1 if p > 0 else p for p in parents]  # some group id never used ... or none if all 0
    elif drop == "negative":
        parents = parents[:-1] + [-1]
    return parents, drop, len(parents) + (1 if drop in ("entry", "short") else 0)


@settings(max_examples=80, **SETTINGS)
@given(pl=parent_lists(), d=st.integers(1, 5), center=st.sampled_from(["learned", "mean", "anchored"]))
def test_hierarchical_linear_missing_entries_raise(pl, d, center):
    parents, drop, num_classes = pl
    used = sorted(set(parents))
    valid = min(parents) >= 0 and used == list(range(max(parents) + 1)) and len(parents) == num_classes
    counts = [parents.count(g) for g in used]
    if valid and center == "mean" and min(counts) < 2:
        _raises_naming("center", HierarchicalLinear, d, num_classes, hierarchy=parents, center=center)
        return
    if not valid:
        _raises_naming("hierarchy", HierarchicalLinear, d, num_classes, hierarchy=parents, center=center)
        return
    layer = HierarchicalLinear(d, num_classes, hierarchy=parents, center=center)
    x = torch.randn(4, d)
    out = layer(x)
    assert out.shape == (4, num_classes) and bool(torch.isfinite(out).all())
    grads = torch.autograd.grad(out.sum(), list(layer.parameters()), allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


def test_hierarchy_with_missing_entries_is_named_everywhere():
    from lightning_hyper.callbacks import HierarchicalRegularizer

    _raises_naming("hierarchy", Hierarchy.parse, "no_such_tree")
    _raises_naming("hierarchy", Hierarchy.parse, {"parents": [0, 2]})  # group 1 has no child
    _raises_naming("hierarchy", Hierarchy.from_adjacency, [[[1, 0], [0, 0]]])  # class 1 without parent
    _raises_naming("hierarchy", Hierarchy, [[0, 0, 1], [0, 1]])  # level 1 has 3 nodes, level 2 names 2 parents
    # a regularizer whose hierarchy covers fewer classes than the output layer has rows
    cb = HierarchicalRegularizer(hierarchy=[0, 0, 1])
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    _raises_naming("hierarchy", cb.penalty, model, (torch.randn(2, 3), torch.tensor([0, 1])), False)
    # batch labels outside the hierarchy
    cb = HierarchicalRegularizer(hierarchy=[0, 0, 1, 1, 2])
    _raises_naming("labels", cb.penalty, model, (torch.randn(2, 3), torch.tensor([0, 7])), False)
    layer_model = nn.Sequential(nn.Linear(3, 4), HierarchicalLinear(4, hierarchy=[0, 0, 1]))
    cb = HierarchicalRegularizer(hierarchy=[0, 1, 1])  # differs from the layer's own tree
    _raises_naming("hierarchy", cb.penalty, layer_model, (torch.randn(2, 3), torch.tensor([0, 1])), False)


# ------------------------------------------------------------------------------ memory bound
N_MEM, D_MEM = 2000, 64
NND = N_MEM * N_MEM * D_MEM * 4  # bytes of one float32 N x N x d tensor (1.02 GB)
NN = N_MEM * N_MEM * 4  # one float32 N x N matrix (16 MB)


def _energy_fwd_bwd(**kw):
    def run():
        w = torch.randn(N_MEM, D_MEM, requires_grad=True)
        hyperspherical_energy(w, **kw).backward()
        assert bool(torch.isfinite(w.grad).all())
    return run


def _fwd_bwd(fn):
    def run():
        w = torch.randn(N_MEM, D_MEM, requires_grad=True)
        fn(w).sum().backward()
        assert bool(torch.isfinite(w.grad).all())
    return run


@pytest.mark.parametrize("case, fn, budget", [
    ("energy one block", _energy_fwd_bwd(), 8 * NN),
    ("energy half-space angular", _energy_fwd_bwd(metric="angular", half_space=True, s=0.0), 10 * NN),
    ("energy chunk 128", _energy_fwd_bwd(chunk_size=128), NN),
    ("pairwise angles", _fwd_bwd(pairwise_angles), 10 * NN),
    ("output energy from labels", _fwd_bwd(lambda w: output_energy_from_labels(w, torch.arange(0, N_MEM, 7))), 4 * NN),
    ("compressive energy C=2", _fwd_bwd(lambda w: compressive_energy(w, torch.randn(2, 30, D_MEM))), 20 * NN),
    ("DH2L metric energy AMcos", _fwd_bwd(lambda w: metric_energy(w, "AMcos")), 30 * NN),
])
def test_no_n_by_n_by_d_allocation(case, fn, budget):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = peak_rss_delta(fn)
    finally:
        torch.set_num_threads(threads)
    assert peak < budget, f"{case}: peak {peak / 1e6:.0f} MB >= budget {budget / 1e6:.0f} MB"
    assert peak < NND / 2, f"{case}: peak {peak / 1e6:.0f} MB is of the order of an N x N x d tensor"
