"""SphereNet / DCNet operator math against independent float64 references (unfold + per-patch formulas)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_hyper.functional import margin
from lightning_hyper.functional.margin import ga_psi
from lightning_hyper.functional.operators import (
    MAGNITUDE_FNS,
    angle_function,
    angle_sigmoid,
    angular_activation,
    decoupled_conv,
    decoupled_linear,
    magnitude_function,
    patch_norms,
    safe_acos,
    sphere_conv,
    sphere_linear,
)
from lightning_hyper.functional.orthogonal import kernel_orthogonality

D = torch.float64
PI = math.pi
CONV_GRID = [  # (stride, padding, dilation, groups)
    (1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 1, 2, 2), (1, 1, 1, 2), (3, 0, 1, 2),
]


# ------------------------------------------------------------------ independent reference
def ref_parts(x, w, stride, padding, dilation, groups):
    """Per (n, out channel, location): dot w.x, ||x_patch||, ||w|| from F.unfold (float64)."""
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    cg, og = c_in // groups, c_out // groups
    dots, pns = [], []
    for g in range(groups):
        u = F.unfold(x[:, g * cg:(g + 1) * cg], w.shape[2:], dilation=dilation, padding=padding, stride=stride)
        for o in range(g * og, (g + 1) * og):
            wv = w[o].reshape(-1)
            dots.append(torch.einsum("d,ndl->nl", wv, u))
            pns.append(u.norm(dim=1))
    return torch.stack(dots, 1), torch.stack(pns, 1), w.flatten(1).norm(dim=1)


def out_shape(x, w, stride, padding, dilation):
    return [(s + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for s, k in zip(x.shape[2:], w.shape[2:])]


def ref_g(theta, name, k=None):
    """Angle functions written out from the thesis (exp form for the sigmoid)."""
    if name == "linear":
        return 1 - 2 * theta / PI
    if name == "cosine":
        return np.cos(theta)
    if name == "sqcos":
        return np.sign(np.cos(theta)) * np.cos(theta) ** 2
    if name == "relu_cos":
        return np.maximum(np.cos(theta), 0)
    e = np.exp(theta / k - PI / (2 * k))
    return (1 + np.exp(-PI / (2 * k))) / (1 - np.exp(-PI / (2 * k))) * (1 - e) / (1 + e)


def ref_h(n, name, alpha, rho=None, beta=None):
    if name == "sphere":
        return alpha * np.ones_like(n)
    if name == "ball":
        return alpha * np.minimum(n, rho) / rho
    if name == "tanh":
        return alpha * np.tanh(n / rho)
    if name == "linear":
        return alpha * n
    if name == "seg":
        return np.where(n <= rho, alpha * n, beta * n + alpha * rho - beta * rho)
    if name == "log":
        return alpha * np.log(1 + n)
    return alpha * n + beta * np.log(1 + n)  # mix


def rand_conv(groups=2, c_in=4, c_out=6, size=9, k=3, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, size, size, dtype=D, generator=gen)
    w = torch.randn(c_out, c_in // groups, k, k, dtype=D, generator=gen)
    return x, w


# ------------------------------------------------------------------ patch norms
@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_GRID)
def test_patch_norms_equal_unfold(stride, padding, dilation, groups):
    x, w = rand_conv(groups)
    got = patch_norms(x, 3, stride, padding, dilation, groups, eps=0.0)
    _, pn, _ = ref_parts(x, w, stride, padding, dilation, groups)
    oh, ow = out_shape(x, w, stride, padding, dilation)
    per_group = pn.view(2, groups, 6 // groups, oh, ow)[:, :, 0]
    assert got.shape == (2, groups, oh, ow)
    torch.testing.assert_close(got, per_group, atol=1e-12, rtol=0)


def test_patch_norms_eps_inside_sqrt_and_nonsquare_kernel():
    x = torch.randn(1, 3, 7, 6, dtype=D)
    got = patch_norms(x, (3, 2), (2, 1), (1, 0), 1, 1, eps=0.5)
    u = F.unfold(x, (3, 2), padding=(1, 0), stride=(2, 1))
    torch.testing.assert_close(got.flatten(), torch.sqrt(u.pow(2).sum(1) + 0.5).flatten(), atol=1e-12, rtol=0)


def test_patch_norms_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        patch_norms(torch.randn(1, 3, 5, 5), 3, groups=2)


# ------------------------------------------------------------------ angle functions
TABLE = {  # spherenet spec §1.2 reference values at 0, pi/6, pi/4, pi/3, pi/2, 2pi/3, pi
    ("linear", None): [1, 0.666667, 0.5, 0.333333, 0, -0.333333, -1],
    ("cosine", None): [1, 0.866025, 0.707107, 0.5, 0, -0.5, -1],
    ("sigmoid", 0.1): [1, 0.999944, 0.999224, 0.989414, 0, -0.989414, -1],
    ("sigmoid", 0.3): [1, 0.950909, 0.873266, 0.710245, 0, -0.710245, -1],
    ("sigmoid", 0.5): [1, 0.851237, 0.715033, 0.523875, 0, -0.523875, -1],
    ("sigmoid", 0.7): [1, 0.784341, 0.629397, 0.442288, 0, -0.442288, -1],
}
THETAS = torch.tensor([0, PI / 6, PI / 4, PI / 3, PI / 2, 2 * PI / 3, PI], dtype=D)


@pytest.mark.parametrize("name,k", list(TABLE))
def test_angle_function_reference_table(name, k):
    got = angle_function(THETAS, name, k)
    torch.testing.assert_close(got, torch.tensor(TABLE[(name, k)], dtype=D), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,k", [("linear", None), ("cosine", None), ("sqcos", None), ("sigmoid", 0.1),
                                    ("sigmoid", 0.3), ("sigmoid", 1.0)])
def test_angle_function_shape_properties(name, k):
    theta = torch.linspace(0, PI, 1001, dtype=D)
    g = angle_function(theta, name, k)
    assert torch.all(g[1:] <= g[:-1] + 1e-15), "non-increasing"
    torch.testing.assert_close(angle_function(PI - theta, name, k), -g, atol=1e-12, rtol=0)  # odd about pi/2
    ends = angle_function(torch.tensor([0.0, PI / 2, PI], dtype=D), name, k)
    torch.testing.assert_close(ends, torch.tensor([1.0, 0.0, -1.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(g, torch.as_tensor(ref_g(theta.numpy(), name, k)), atol=1e-12, rtol=0)


def test_sigmoid_limits_and_float32_stability():
    theta = torch.linspace(0, PI, 1001, dtype=D)
    assert (angle_sigmoid(theta, 10.0) - (1 - 2 * theta / PI)).abs().max() < 1e-3
    assert (angle_sigmoid(theta, 100.0) - (1 - 2 * theta / PI)).abs().max() < 1e-4
    far = (theta - PI / 2).abs() > 0.1
    assert (angle_sigmoid(theta, 0.01)[far] - torch.sign(torch.cos(theta))[far]).abs().max() < 1e-3
    t32 = theta.float()
    for k in (1e-3, 0.01):
        assert torch.isfinite(angle_sigmoid(t32, k)).all()
    # the literal exp form of eq. 3.4 overflows in float32 for small k: why the tanh form is used
    with np.errstate(all="ignore"):
        literal = ref_g(t32.numpy(), "sigmoid", np.float32(0.01))
    assert np.isnan(literal).any()


@pytest.mark.parametrize("name,k", [("linear", None), ("cosine", None), ("sqcos", None), ("sigmoid", 0.3),
                                    ("sigmoid", 0.7)])
def test_angle_derivative_matches_formula(name, k):
    theta = torch.linspace(0.05, PI - 0.05, 201, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(angle_function(theta, name, k).sum(), theta)
    t = theta.detach()
    if name == "linear":
        ref = torch.full_like(t, -2 / PI)
    elif name == "cosine":
        ref = -torch.sin(t)
    elif name == "sqcos":
        ref = -2 * torch.cos(t).abs() * torch.sin(t)
    else:  # the thesis' printed derivative needs the constant C (spec §10 item 2)
        c = (1 + math.exp(-PI / (2 * k))) / (1 - math.exp(-PI / (2 * k)))
        e = torch.exp((t - PI / 2) / k)
        ref = -c * 2 * e / (k * (1 + e) ** 2)
    torch.testing.assert_close(grad, ref, atol=1e-8, rtol=0)


def test_safe_acos_finite_at_boundaries():
    c = torch.tensor([-1.0, -1 + 1e-9, 0.0, 0.3, 1 - 1e-9, 1.0], dtype=D, requires_grad=True)
    theta = safe_acos(c)
    (g,) = torch.autograd.grad(theta.sum(), c)
    assert torch.isfinite(theta).all() and torch.isfinite(g).all()
    assert g.abs().max() <= 1e3 + 1e-9  # capped factor
    torch.testing.assert_close(theta[2:4], torch.acos(c[2:4].detach()))
    torch.testing.assert_close(g[2:4], -1 / torch.sqrt(1 - c[2:4].detach() ** 2))
    c32 = torch.ones(3, requires_grad=True)
    assert torch.isfinite(safe_acos(c32)).all()


def test_angular_activation_from_cos_equals_angle_function():
    c = torch.linspace(-0.999, 0.999, 301, dtype=D)
    for name, k in [("linear", None), ("cosine", None), ("sqcos", None), ("relu_cos", None), ("sigmoid", 0.4)]:
        torch.testing.assert_close(angular_activation(c, name, k), angle_function(torch.acos(c), name, k))


# ------------------------------------------------------------------ SphereConv
@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_GRID)
@pytest.mark.parametrize("angle_fn,k", [("linear", None), ("cosine", None), ("sigmoid", 0.3), ("learnable", 0.7)])
def test_sphere_conv_matches_unfold_reference(stride, padding, dilation, groups, angle_fn, k):
    x, w = rand_conv(groups)
    eps = 1e-4
    got = sphere_conv(x, w, None, stride, padding, dilation, groups, angle_fn, k, eps=eps)
    dot, pn, wn = ref_parts(x, w, stride, padding, dilation, groups)
    cos = dot / np.sqrt(pn ** 2 + eps) / np.sqrt(wn[None, :, None] ** 2 + eps)
    ref = ref_g(np.arccos(cos.numpy()), "cosine" if angle_fn == "cosine" else
                "sigmoid" if angle_fn in ("sigmoid", "learnable") else "linear", k)
    torch.testing.assert_close(got.flatten(2), torch.as_tensor(ref), atol=1e-10, rtol=0)


def test_sphere_conv_per_filter_k_and_bias():
    x, w = rand_conv(1, c_in=3, c_out=4)
    k = torch.tensor([0.1, 0.3, 0.5, 2.0], dtype=D)
    b = torch.randn(4, dtype=D)
    got = sphere_conv(x, w, b, 1, 1, 1, 1, "sigmoid", k)
    for o in range(4):
        one = sphere_conv(x, w[o:o + 1], None, 1, 1, 1, 1, "sigmoid", float(k[o]))
        torch.testing.assert_close(got[:, o:o + 1], one + b[o])


def test_sphere_conv_1d_and_3d_match_unfold():
    x1 = torch.randn(2, 4, 11, dtype=D)
    w1 = torch.randn(6, 2, 3, dtype=D)
    got = sphere_conv(x1, w1, None, 2, 1, 2, 2, "linear")
    dot, pn, wn = ref_parts(x1[..., None, :], w1[..., None, :], (1, 2), (0, 1), (1, 2), 2)
    cos = dot / torch.sqrt(pn ** 2 + 1e-4) / torch.sqrt(wn[None, :, None] ** 2 + 1e-4)
    torch.testing.assert_close(got, (1 - 2 * torch.acos(cos) / PI).view_as(got), atol=1e-10, rtol=0)
    x3 = torch.randn(1, 2, 4, 4, 4, dtype=D)
    w3 = torch.randn(3, 2, 2, 2, 2, dtype=D)
    out = sphere_conv(x3, w3, None, 2, 0, 1, 1, "cosine", eps=0.0)
    patch = x3[0, :, :2, :2, 2:4].reshape(-1)  # output position (0, 0, 1)
    ref = (w3.flatten(1) @ patch) / (w3.flatten(1).norm(dim=1) * patch.norm())
    torch.testing.assert_close(out[0, :, 0, 0, 1], ref)


def test_sphere_linear_equals_full_kernel_sphere_conv():
    x = torch.randn(5, 3, 4, 4, dtype=D)
    w = torch.randn(7, 3, 4, 4, dtype=D)
    for angle_fn, k in [("linear", None), ("cosine", None), ("sigmoid", 0.3)]:
        conv = sphere_conv(x, w, None, 1, 0, 1, 1, angle_fn, k)
        lin = sphere_linear(x.flatten(1), w.flatten(1), None, angle_fn, k)
        torch.testing.assert_close(conv.flatten(1), lin, atol=1e-10, rtol=0)


def test_sphere_linear_matches_loop_and_leading_dims():
    x = torch.randn(2, 3, 5, dtype=D)
    w = torch.randn(4, 5, dtype=D)
    got = sphere_linear(x, w, None, "linear", eps=0.0)
    for i, j, o in itertools.product(range(2), range(3), range(4)):
        c = float(x[i, j] @ w[o] / (x[i, j].norm() * w[o].norm()))
        assert abs(float(got[i, j, o]) - (1 - 2 * math.acos(c) / PI)) < 1e-10


def test_cosine_sphere_conv_is_plain_conv_of_normalized_patches():
    x = torch.randn(2, 3, 6, 6, dtype=D)
    w = torch.randn(4, 3, 6, 6, dtype=D)  # one patch per sample: normalize the input itself
    x_hat = x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    w_hat = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(sphere_conv(x, w, eps=0.0), F.conv2d(x_hat, w_hat))


@pytest.mark.parametrize("angle_fn,k", [("linear", None), ("cosine", None), ("sigmoid", 0.3)])
def test_sphere_conv_scale_invariant_and_bounded(angle_fn, k):
    x, w = rand_conv(2)
    base = sphere_conv(x, w, None, 2, 1, 1, 2, angle_fn, k, eps=0.0)
    for a, b in [(0.1, 0.01), (10.0, 100.0), (1000.0, 0.01)]:
        torch.testing.assert_close(sphere_conv(a * x, b * w, None, 2, 1, 1, 2, angle_fn, k, eps=0.0), base,
                                   atol=1e-10, rtol=0)
    for s in (1e-3, 1.0, 1e3):
        out = sphere_conv(s * x, w, None, 1, 1, 1, 2, angle_fn, k)
        assert out.abs().max() <= 1.0


@pytest.mark.parametrize("angle_fn", ["linear", "cosine", "sigmoid", "learnable"])
def test_zero_patches_and_zero_filters_finite(angle_fn):
    x = torch.zeros(1, 2, 5, 5, dtype=D)
    x[0, :, 3:, 3:] = torch.randn(2, 2, 2, dtype=D)  # some all-zero patches, some not
    w = torch.randn(4, 2, 3, 3, dtype=D)
    w[1] = 0.0
    x.requires_grad_(True)
    w.requires_grad_(True)
    k = 0.3 if angle_fn in ("sigmoid", "learnable") else None
    out = sphere_conv(x, w, None, 1, 1, 1, 1, angle_fn, k)
    assert torch.isfinite(out).all()
    assert out[0, 1].abs().max() == 0.0  # zero filter -> cos = 0 -> g(pi/2) = 0
    assert out[0, :, 0, 0].abs().max() == 0.0  # all-zero patch
    gx, gw = torch.autograd.grad(out.square().sum() + out.sum(), (x, w))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("angle_fn", ["linear", "cosine", "sigmoid"])
def test_sphere_conv_gradcheck(angle_fn):
    x, w = rand_conv(2, c_in=4, c_out=4, size=5, seed=3, batch=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    k = torch.tensor([0.3, 0.5, 0.7, 1.0], dtype=D, requires_grad=True) if angle_fn == "sigmoid" else None
    inputs = (x, w) if k is None else (x, w, k)

    def f(*args):
        kk = args[2] if len(args) > 2 else None
        return sphere_conv(args[0], args[1], None, 2, 1, 2, 2, angle_fn, kk)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_sphere_conv_none_is_plain_conv():
    x, w = rand_conv(2)
    b = torch.randn(6, dtype=D)
    torch.testing.assert_close(sphere_conv(x, w, b, 2, 1, 1, 2, "none"), F.conv2d(x, w, b, 2, 1, 1, 2))


@pytest.mark.parametrize("angle_fn", ["linear", "cosine"])
def test_autocast_bfloat16_computes_in_float32_and_stays_bounded(angle_fn):
    w = torch.randn(4, 3, 3, 3)
    x = torch.cat([torch.randn(2, 3, 3, 3), 50 * w[:1]])  # the last input is a patch aligned with filter 0
    ref = sphere_conv(x, w, None, 1, 0, 1, 1, angle_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sphere_conv(x, w, None, 1, 0, 1, 1, angle_fn)
        dec = decoupled_conv(x, w, None, 1, 0, 1, 1, "sphere", angle_fn)
        lin = sphere_linear(x.flatten(1), w.flatten(1), None, angle_fn)
    for o in (out, dec, lin):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o.flatten() - ref.flatten()).abs().max() < 0.05 and o.abs().max() <= 1.0


# ------------------------------------------------------------------ decoupled operators
ANGULARS = [("linear", None), ("cosine", None), ("sigmoid", 0.4), ("sqcos", None), ("relu_cos", None)]


def _ref_decoupled(x, w, conv_args, magnitude, angular, k, alpha, rho, beta, weighted, eps, scale=1.0):
    dot, pn, wn = ref_parts(x, w, *conv_args)
    xn = np.sqrt(pn.numpy() ** 2 + eps)
    wnn = np.sqrt(wn.numpy() ** 2 + eps)[None, :, None]
    cos = dot.numpy() / xn / wnn
    rho_e = None if rho is None else rho.numpy()[None, :, None] * scale
    if weighted == "nonlinear_joint":
        h = alpha * np.tanh(xn * wnn / rho_e)
    elif weighted == "nonlinear_separate":
        h = alpha * np.tanh(wnn / rho.numpy()[None, :, None]) * np.tanh(xn / rho_e)
    else:
        h = ref_h(xn, magnitude, alpha, rho_e, beta)
        if weighted == "linear":
            h = h * wnn
    return torch.as_tensor(h * ref_g(np.arccos(np.clip(cos, -1, 1)), angular, k))


@pytest.mark.parametrize("magnitude", MAGNITUDE_FNS)
@pytest.mark.parametrize("angular,k", ANGULARS)
def test_decoupled_conv_matches_reference(magnitude, angular, k):
    x, w = rand_conv(2, seed=7)
    rho = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 8.0], dtype=D)
    beta = 0.5 if magnitude == "seg" else 0.7
    conv_args = (2, 1, 2, 2)
    for fast in (True, False):
        got = decoupled_conv(x, w, None, *conv_args, magnitude=magnitude, angular=angular, alpha=1.5, rho=rho,
                             beta=beta, k=k, fast=fast)
        ref = _ref_decoupled(x, w, conv_args, magnitude, angular, k, 1.5, rho, beta, "none", 1e-4)
        torch.testing.assert_close(got.flatten(2), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("weighted,magnitude", [("linear", "ball"), ("linear", "log"), ("linear", "sphere"),
                                                ("nonlinear_joint", "tanh"), ("nonlinear_separate", "tanh")])
@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_GRID[:4])
def test_weighted_decoupled_conv_and_radius_scale(weighted, magnitude, stride, padding, dilation, groups):
    x, w = rand_conv(groups, seed=11)
    rho = torch.linspace(0.5, 4.0, 6, dtype=D)
    args = (stride, padding, dilation, groups)
    for angular, k in [("cosine", None), ("linear", None), ("sigmoid", 0.3)]:
        got = decoupled_conv(x, w, None, *args, magnitude=magnitude, angular=angular, rho=rho, k=k,
                             weighted=weighted, radius_scale=2.5)
        ref = _ref_decoupled(x, w, args, magnitude, angular, k, 1.0, rho, None, weighted, 1e-4, scale=2.5)
        torch.testing.assert_close(got.flatten(2), ref, atol=1e-10, rtol=0)


def test_decoupled_batch_radius_scale_is_mean_patch_norm():
    x, w = rand_conv(1, seed=2)
    rho = torch.ones(6, dtype=D)
    xn_mean = patch_norms(x, 3, 1, 1, 1, 1).mean()
    a = decoupled_conv(x, w, None, 1, 1, 1, 1, "tanh", radius_scale="batch", rho=rho)
    b = decoupled_conv(x, w, None, 1, 1, 1, 1, "tanh", radius_scale=xn_mean, rho=rho)
    torch.testing.assert_close(a, b)


def test_decoupled_linear_matches_per_sample_loop():
    x = torch.randn(5, 7, dtype=D)
    w = torch.randn(3, 7, dtype=D)
    rho = torch.tensor([0.5, 2.0, 3.0], dtype=D)
    for magnitude in MAGNITUDE_FNS:
        for angular, k in ANGULARS[:4]:
            got = decoupled_linear(x, w, None, magnitude, angular, 1.2, rho, 0.3, k, eps=0.0)
            for i, o in itertools.product(range(5), range(3)):
                c = float(x[i] @ w[o] / (x[i].norm() * w[o].norm()))
                h = ref_h(np.array(float(x[i].norm())), magnitude, 1.2, float(rho[o]), 0.3)
                ref = h * ref_g(np.arccos(np.clip(c, -1, 1)), angular, k)
                assert abs(float(got[i, o]) - float(ref)) < 1e-10, (magnitude, angular)


def test_decoupled_special_cases():
    x, w = rand_conv(1, seed=5)
    conv = F.conv2d(x, w, None, 1, 1)
    # linearly weighted LinearConv + cos is the ordinary convolution (exact with eps = 0)
    torch.testing.assert_close(decoupled_conv(x, w, None, 1, 1, magnitude="linear", weighted="linear", eps=0.0),
                               conv)
    lin_weighted = decoupled_conv(x, w, None, 1, 1, magnitude="linear", weighted="linear")
    rel = (lin_weighted - conv).abs().max() / conv.abs().max()
    assert rel < 1e-3
    w_hat = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(decoupled_conv(x, w, None, 1, 1, magnitude="linear", eps=0.0),
                               F.conv2d(x, w_hat, None, 1, 1))
    kw = dict(bias=None, stride=1, padding=1, angular="linear")
    lin = decoupled_conv(x, w, magnitude="linear", alpha=1.3, **kw)
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="seg", alpha=1.3, beta=1.3, rho=1.0, **kw), lin)
    rho = 2.0
    ball = decoupled_conv(x, w, magnitude="ball", rho=rho, **kw)
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="seg", beta=0.0, rho=rho, **kw), rho * ball)
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="mix", beta=0.0, **kw),
                               decoupled_conv(x, w, magnitude="linear", **kw))
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="mix", alpha=0.0, beta=1.0, **kw),
                               decoupled_conv(x, w, magnitude="log", **kw))
    xn = patch_norms(x, 3, 1, 1, 1, 1)
    big, small = float(xn.max()) * 1.01, float(xn.min()) * 0.99
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="ball", rho=big, **kw),
                               decoupled_conv(x, w, magnitude="linear", **kw) / big)
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="ball", rho=small, **kw),
                               decoupled_conv(x, w, magnitude="sphere", **kw))
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="tanh", rho=float(xn.min()) / 40, **kw),
                               decoupled_conv(x, w, magnitude="sphere", **kw), atol=1e-6, rtol=0)
    t = decoupled_conv(x, w, magnitude="tanh", rho=50 * float(xn.max()), **kw)
    lin50 = decoupled_conv(x, w, magnitude="linear", **kw) / (50 * float(xn.max()))
    assert ((t - lin50).abs().max() / lin50.abs().max()) < 1e-3
    # sphere magnitude with alpha = 1 is SphereConv
    torch.testing.assert_close(decoupled_conv(x, w, magnitude="sphere", **kw),
                               sphere_conv(x, w, None, 1, 1, 1, 1, "linear"))


@pytest.mark.parametrize("magnitude", ["sphere", "ball", "tanh"])
def test_bounded_decoupled_operators_stay_in_range(magnitude):
    x, w = rand_conv(2, seed=4)
    for s in (1e-3, 1.0, 1e3):
        for angular in ("linear", "cosine", "sqcos"):
            out = decoupled_conv(s * x, w, None, 1, 1, 1, 2, magnitude, angular, alpha=2.0, rho=0.7,
                                 radius_scale="batch")
            assert out.abs().max() <= 2.0 + 1e-12


@pytest.mark.parametrize("magnitude", MAGNITUDE_FNS)
def test_decoupled_odd_and_kernel_scale_invariant(magnitude):
    x, w = rand_conv(2, seed=8)
    f = lambda xx, ww: decoupled_conv(xx, ww, None, 1, 1, 1, 2, magnitude, "linear", rho=1.5, beta=0.5, eps=0.0)  # noqa: E731
    base = f(x, w)
    torch.testing.assert_close(f(-x, w), -base, atol=1e-12, rtol=0)
    c = torch.tensor([0.1, 3.0, 7.0, 0.5, 2.0, 100.0], dtype=D).view(-1, 1, 1, 1)
    torch.testing.assert_close(f(x, c * w), base, atol=1e-10, rtol=0)


@pytest.mark.parametrize("magnitude", MAGNITUDE_FNS)
def test_decoupled_zero_patches_finite_gradients(magnitude):
    x = torch.zeros(1, 2, 5, 5, dtype=D)
    x[0, :, 3:, 3:] = 1.0
    w = torch.randn(3, 2, 3, 3, dtype=D)
    w[0] = 0
    rho = torch.ones(3, dtype=D, requires_grad=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    for angular in ("linear", "cosine", "sigmoid", "sqcos"):
        out = decoupled_conv(x, w, None, 1, 1, 1, 1, magnitude, angular, rho=rho, beta=0.5, k=0.3,
                             radius_scale="batch")
        grads = torch.autograd.grad(out.sum() + out.square().sum(), (x, w, rho), allow_unused=True)
        assert torch.isfinite(out).all()
        assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("magnitude,weighted", [("tanh", "none"), ("sphere", "none"), ("log", "linear"),
                                                ("mix", "none"), ("ball", "none"), ("seg", "none"),
                                                ("tanh", "nonlinear_joint"), ("tanh", "nonlinear_separate")])
def test_decoupled_gradcheck(magnitude, weighted):
    x, w = rand_conv(2, c_in=4, c_out=4, size=5, seed=9, batch=1)
    rho = torch.tensor([0.6, 1.7, 2.9, 4.4], dtype=D)
    xn = patch_norms(x, 3, 2, 1, 2, 2)
    # keep away from the BallConv / SegConv kinks at ||x|| = rho
    assert ((xn.view(-1, 1) - rho.view(1, -1)).abs() > 1e-3).all()
    x.requires_grad_(True)
    w.requires_grad_(True)
    rho.requires_grad_(True)
    angular = "linear" if magnitude in ("sphere", "ball") else "cosine"

    def f(xx, ww, rr):
        return decoupled_conv(xx, ww, None, 2, 1, 2, 2, magnitude, angular, rho=rr, beta=0.5, weighted=weighted)

    assert torch.autograd.gradcheck(f, (x, w, rho), eps=1e-6, atol=1e-6, fast_mode=True)


def test_eq_4_17_gradient_is_orthogonal_and_scaled():
    x = torch.randn(1, 3, 3, 3, dtype=D)
    w = torch.randn(1, 3, 3, 3, dtype=D, requires_grad=True)
    out = decoupled_conv(x, w, None, magnitude="sphere", angular="cosine", eps=0.0)
    (g,) = torch.autograd.grad(out.sum(), w)
    wv, xv = w.detach().flatten(), x.flatten()
    w_hat, x_hat = wv / wv.norm(), xv / xv.norm()
    ref = (x_hat - (w_hat @ x_hat) * w_hat) / wv.norm()
    torch.testing.assert_close(g.flatten(), ref, atol=1e-14, rtol=0)
    assert abs(float(g.flatten() @ wv)) < 1e-12


def test_magnitude_function_direct_values():
    n = torch.tensor([0.5, 1.0, 3.0], dtype=D)
    torch.testing.assert_close(magnitude_function(n, "seg", 1.0, 2.0, 0.5), torch.tensor([0.5, 1.0, 2.5], dtype=D))
    torch.testing.assert_close(magnitude_function(n, "ball", 2.0, 1.0), torch.tensor([1.0, 2.0, 2.0], dtype=D))
    assert magnitude_function(n, "sphere", 3.0) == 3.0


# ------------------------------------------------------------------ GA-Softmax psi
def test_ga_psi_reference_values_and_properties():
    theta = torch.linspace(0, PI, 2001, dtype=D)
    cos = torch.cos(theta)
    for m in (1, 2, 3, 4):
        lin = ga_psi(cos, m, "linear", acos_eps=1e-15)
        torch.testing.assert_close(lin, 1 - 2 * m * theta / PI, atol=1e-6, rtol=0)
        cosine = ga_psi(cos, m, "cosine")
        j = torch.clamp(torch.floor(theta * m / PI), max=m - 1)
        torch.testing.assert_close(cosine, (-1) ** j * torch.cos(m * theta) - 2 * j, atol=1e-12, rtol=0)
        torch.testing.assert_close(cosine, margin.psi(cos, m), atol=1e-12, rtol=0)  # SphereFace's psi
        sig = ga_psi(cos, m, "sigmoid", k=0.3, acos_eps=1e-15)
        for psi in (lin, cosine, sig):
            assert torch.all(psi[1:] < psi[:-1]), "strictly decreasing"
            assert abs(float(psi[0]) - 1) < 1e-6 and abs(float(psi[-1]) - (1 - 2 * m)) < 1e-6
            assert (psi[1:] - psi[:-1]).abs().max() < 0.02  # continuous on a fine grid
    nodes = torch.cos(torch.arange(9, dtype=D) * PI / 8)
    for g in ("linear", "cosine"):
        torch.testing.assert_close(ga_psi(nodes, 4, g, acos_eps=1e-15), 1 - torch.arange(9, dtype=D), atol=1e-6, rtol=0)
    torch.testing.assert_close(ga_psi(cos, 1, "sigmoid", 0.3), angular_activation(cos, "sigmoid", 0.3))
    torch.testing.assert_close(ga_psi(cos, 3, "cosine", mode="direct"), torch.cos(3 * theta), atol=1e-12, rtol=0)


def test_ga_psi_gradients_finite_at_boundaries():
    c = torch.tensor([1.0, -1.0, 0.5, math.cos(PI / 4)], dtype=D, requires_grad=True)
    for g, k in [("linear", None), ("cosine", None), ("sigmoid", 0.3)]:
        (grad,) = torch.autograd.grad(ga_psi(c, 4, g, k).sum(), c)
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------ bad input
def test_bad_names_and_parameters():
    x, w = rand_conv(1)
    with pytest.raises(ValueError, match=r"angle_fn='foo'.*accepted values.*cosine"):
        sphere_conv(x, w, angle_fn="foo")
    with pytest.raises(ValueError, match=r"magnitude='cube'.*accepted values.*tanh"):
        decoupled_conv(x, w, magnitude="cube")
    with pytest.raises(ValueError, match=r"angular='tan'.*accepted values.*sqcos"):
        decoupled_conv(x, w, angular="tan", rho=1.0)
    with pytest.raises(ValueError, match=r"weighted='nonlinear_joint' is not supported; "
                                         r"accepted values: 'none', 'linear'.*only for magnitude='tanh'"):
        decoupled_conv(x, w, magnitude="ball", weighted="nonlinear_joint", rho=1.0)
    with pytest.raises(ValueError, match=r"k=.* is not supported; accepted values: a finite number >"):
        angle_sigmoid(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"k=.* is not supported; accepted values: a finite number >"):
        sphere_conv(x, w, angle_fn="sigmoid", k=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        decoupled_conv(x, w, magnitude="sphere", alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        decoupled_conv(x, w, magnitude="seg", rho=1.0, beta=-0.5)
    with pytest.raises(ValueError, match=r"m=.* is not supported; accepted values: an int >= 1"):
        ga_psi(torch.zeros(2), 0)
    with pytest.raises(ValueError, match=r"psi_mode='x'.*monotonic"):
        ga_psi(torch.zeros(2), 2, mode="x")
    with pytest.raises(ValueError, match="radius rho"):
        decoupled_conv(x, w, magnitude="tanh")


def test_full_gradcheck_tiny_learnable_k():
    """Full (not fast-mode) gradcheck on a tiny strided, dilated, grouped layer, w.r.t. x, w and k."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 5, dtype=D, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, 2, 2, dtype=D, generator=gen, requires_grad=True)
    k = torch.tensor([0.4, 0.9], dtype=D, requires_grad=True)
    f = lambda xx, ww, kk: sphere_conv(xx, ww, None, 2, 1, 2, 2, "learnable", kk)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, k), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ kernel orthogonality (SphereNet §5, DCNet §8.5)
def ref_orthogonality(w, form, normalize=False, eps=0.0):
    """Double loop over kernel pairs, float64: sum_ij (w_i.w_j - delta_ij)^2 or sum_{i != j} (w_i.w_j)^2."""
    w = np.asarray(w, dtype=float)
    if normalize:
        w = w / np.sqrt((w ** 2).sum(1, keepdims=True) + eps)
    total = 0.0
    for i in range(w.shape[0]):
        for j in range(w.shape[0]):
            dot = sum(w[i, k] * w[j, k] for k in range(w.shape[1]))
            if form == "orthonormal":
                total += (dot - (1.0 if i == j else 0.0)) ** 2
            elif i != j:
                total += dot ** 2
    return total


@pytest.mark.parametrize("n,d", [(4, 9), (9, 4)])  # n <= d: n x n Gram; n > d: d x d Gram identity
@pytest.mark.parametrize("form", ["orthonormal", "orthogonal"])
@pytest.mark.parametrize("normalize,eps", [(False, 0.0), (True, 0.0), (True, 1e-4)])
def test_kernel_orthogonality_matches_double_loop(n, d, form, normalize, eps):
    w = torch.randn(n, d, dtype=D, generator=torch.Generator().manual_seed(n * d)) * 0.7
    got = kernel_orthogonality(w, form, normalize, eps)
    assert got.item() == pytest.approx(ref_orthogonality(w.numpy(), form, normalize, eps), rel=1e-10, abs=1e-12)


def test_kernel_orthogonality_zero_cases_and_form_agreement():
    q = torch.nn.init.orthogonal_(torch.empty(6, 27, dtype=D))  # orthonormal rows
    assert kernel_orthogonality(q, "orthonormal").item() < 1e-24
    scaled = q * torch.linspace(0.5, 3.0, 6, dtype=D)[:, None]  # orthogonal, not unit norm
    assert kernel_orthogonality(scaled, "orthogonal").item() < 1e-24
    assert kernel_orthogonality(scaled, "orthonormal").item() > 1.0
    assert kernel_orthogonality(scaled, "orthonormal", normalize=True).item() < 1e-24
    w = torch.randn(5, 8, dtype=D)
    torch.testing.assert_close(kernel_orthogonality(w, "orthonormal", True),
                               kernel_orthogonality(w, "orthogonal", True))
    # conv kernels through as_neurons; zero kernels with normalize give a finite value and gradient
    from lightning_hyper.functional import as_neurons
    conv = torch.randn(4, 2, 3, 3, dtype=D)
    conv[1] = 0.0
    conv.requires_grad_(True)
    out = kernel_orthogonality(as_neurons(conv), "orthogonal", normalize=True)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(conv.grad).all()


@pytest.mark.parametrize("n,d", [(3, 5), (6, 3)])
def test_kernel_orthogonality_gradcheck(n, d):
    w = torch.randn(n, d, dtype=D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    for form in ("orthonormal", "orthogonal"):
        for normalize in (False, True):
            assert torch.autograd.gradcheck(lambda t: kernel_orthogonality(t, form, normalize), (w,))


def test_kernel_orthogonality_optimum():
    """Adam on the penalty alone: -> 0 for n <= d; -> n - d for n > d (G = WW^T has rank <= d)."""
    for (n, d), target in (((8, 12), 0.0), ((12, 5), 7.0)):
        w = (torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * math.sqrt(2 / d)).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=1e-2)
        for _ in range(400):
            opt.zero_grad()
            kernel_orthogonality(w).backward()
            opt.step()
        assert kernel_orthogonality(w.detach()).item() == pytest.approx(target, abs=1e-3)


def test_kernel_orthogonality_bad_input():
    with pytest.raises(ValueError, match=r"form='orthonormalish'.*accepted values.*'orthonormal', 'orthogonal'"):
        kernel_orthogonality(torch.randn(3, 4), "orthonormalish")
    with pytest.raises(ValueError, match=r"neurons: expected an \(n, d\) matrix"):
        kernel_orthogonality(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match=r"eps=.* is not supported; accepted values: a finite number >= 0"):
        kernel_orthogonality(torch.randn(3, 4), eps=-1.0)


# ------------------------------------------------------------------ fused autograd Functions vs plain autograd
# Each custom Function (operators._SquareSum, _PatchSquareSums, _AsinActivation, _DecoupledProduct) against the
# plain autograd composition of the same formula, in float64: values and gradients, plus gradcheck on tiny shapes.
from lightning_hyper.functional import operators as ops  # noqa: E402

FUSED_ANGULAR = ["cosine", "sqcos", "relu_cos", "linear", "sigmoid"]


def _plain_square_sums(x, ks, stride, padding, dilation, groups):
    sq = (x * x).unflatten(1, (groups, x.shape[1] // groups)).sum(2)
    ones = torch.ones((groups, 1, *ks), dtype=x.dtype)
    return ops._CONV[x.dim() - 2](sq, ones, None, stride, padding, dilation, groups)


@pytest.mark.parametrize("nd,ks,padding,dilation,groups", [
    (2, (3, 3), 1, 1, 1), (2, (3, 2), (0, 1), (2, 1), 2), (2, (5, 5), 2, 1, 1), (1, (3,), 2, 2, 1),
    (3, (3, 3, 3), 1, 1, 2), (2, (2, 2), 0, 1, 1),
])
def test_patch_square_sums_match_plain_autograd(nd, ks, padding, dilation, groups):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, *([7] * nd), dtype=D, generator=gen, requires_grad=True)
    back = ops._transposed_padding(nd, ks, 1, padding, dilation)
    assert back is not None
    got = ops._PatchSquareSums.apply(x, ks, padding, dilation, groups, back)
    ref = _plain_square_sums(x, ks, 1, padding, dilation, groups)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    gy = torch.randn(ref.shape, dtype=D, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(ref, x, gy)[0],
                               atol=1e-12, rtol=0)
    small = x[:1, :, *([slice(0, 5)] * nd)].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops._PatchSquareSums.apply(t, ks, padding, dilation, groups, back),
                                    (small,))
    assert torch.autograd.gradgradcheck(lambda t: ops._PatchSquareSums.apply(t, ks, padding, dilation, groups, back),
                                        (small,))


@pytest.mark.parametrize("groups", [1, 2])
def test_square_sum_matches_plain_autograd(groups):
    x = torch.randn(2, 4, 5, 5, dtype=D, generator=torch.Generator().manual_seed(12), requires_grad=True)
    ref = (x * x).unflatten(1, (groups, 4 // groups)).sum(2)
    got = ops._SquareSum.apply(x, groups)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    gy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])
    assert torch.autograd.gradcheck(lambda t: ops._SquareSum.apply(t, groups), (x[:1, :, :3, :3].detach()
                                                                              .requires_grad_(True),))


def test_transposed_padding_applies_only_to_stride_one():
    assert ops._transposed_padding(2, (3, 3), 1, 1, 1) == (1, 1)
    assert ops._transposed_padding(2, (3, 3), 1, (0, 2), (1, 2)) == (2, 2)
    assert ops._transposed_padding(2, (3, 3), 2, 1, 1) is None  # strided: the generic conv backward
    assert ops._transposed_padding(2, (3, 3), 1, "same", 1) is None
    assert ops._transposed_padding(2, (3, 3), 1, 3, 1) is None  # padding beyond the kernel


def _plain_angle(inner, xn, name, k, delta=1e-6):
    """The autograd composition: safe_acos + the angle function (no custom Function but safe_acos's)."""
    return angular_activation(inner * xn.reciprocal(), name, k, delta)


@pytest.mark.parametrize("name,k", [("linear", None), ("sigmoid", 0.3), ("learnable", "tensor")])
def test_asin_activation_matches_plain_autograd(name, k):
    gen = torch.Generator().manual_seed(13)
    xn = (torch.rand(2, 1, 4, 4, dtype=D, generator=gen) + 0.5).requires_grad_(True)
    inner = ((torch.rand(2, 3, 4, 4, dtype=D, generator=gen) * 2 - 1) * xn.detach()).requires_grad_(True)
    with torch.no_grad():
        inner[0, 0, 0, 0] = xn[0, 0, 0, 0]  # |c| = 1: the clamp and the capped derivative
    kk = torch.tensor([0.3, 0.6, 1.1], dtype=D).view(1, 3, 1, 1).requires_grad_(True) if k == "tensor" else k
    fn = "sigmoid" if name == "learnable" else name
    got = ops._AsinActivation.apply(inner, xn, kk, 1e-6, 1e-6)
    ref = _plain_angle(inner, xn, fn, kk)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    leaves = [inner, xn] + ([kk] if k == "tensor" else [])
    gy = torch.randn(ref.shape, dtype=D, generator=gen)
    for a, b in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    small = [inner[:1, :, :2, :2].detach().clone().requires_grad_(True),
             xn[:1, :, :2, :2].detach().requires_grad_(True)]
    with torch.no_grad():
        small[0].mul_(0.9)  # away from the clamp (gradcheck's finite differences)
    if k == "tensor":
        assert torch.autograd.gradcheck(lambda a, b, c: ops._AsinActivation.apply(a, b, c, 1e-6, 1e-6),
                                        (*small, kk))
    else:
        assert torch.autograd.gradcheck(lambda a, b: ops._AsinActivation.apply(a, b, kk, 1e-6, 1e-6), tuple(small))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("radius_scale", [None, "batch"])
@pytest.mark.parametrize("magnitude", MAGNITUDE_FNS)
@pytest.mark.parametrize("angular", FUSED_ANGULAR)
def test_fused_decoupled_matches_autograd_composition(groups, radius_scale, magnitude, angular):
    """fast=True (the fused _DecoupledProduct where it applies) against fast=False (plain autograd), float64."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, 7, 7, dtype=D, generator=gen, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=D, generator=gen, requires_grad=True)
    rho = (torch.rand(6, dtype=D, generator=gen) * 3 + 0.5).requires_grad_(True)
    outs, grads = [], []
    for fast in (True, False):
        out = decoupled_conv(x, w, None, 1, 1, 1, groups, magnitude, angular, alpha=1.3, rho=rho, beta=0.4, k=0.3,
                             radius_scale=radius_scale, fast=fast)
        gy = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(15))
        outs.append(out)
        grads.append(torch.autograd.grad(out, (x, w, rho), gy, allow_unused=True))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=0)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _decoupled_product_cases():
    for magnitude in ("tanh", "ball", "seg", "given_tensor", "given_float"):
        for angular in FUSED_ANGULAR:
            if magnitude.startswith("given") and angular == "cosine":
                continue  # decoupled_combine keeps its one-factor path there
            yield magnitude, angular


@pytest.mark.parametrize("magnitude,angular", list(_decoupled_product_cases()))
def test_decoupled_product_gradcheck_and_plain_reference(magnitude, angular):
    gen = torch.Generator().manual_seed(16)
    xn = (torch.rand(2, 1, 3, 3, dtype=D, generator=gen) + 0.5).requires_grad_(True)
    inner = ((torch.rand(2, 4, 3, 3, dtype=D, generator=gen) * 1.8 - 0.9) * xn.detach()).requires_grad_(True)
    rho = torch.tensor([0.4, 0.9, 1.3, 2.0], dtype=D).view(1, 4, 1, 1).requires_grad_(True)
    assert ((xn.detach() - rho.detach()).abs() > 1e-3).all()  # away from the ball / seg kinks
    h = (torch.rand(2, 1, 3, 3, dtype=D, generator=gen) + 0.2).requires_grad_(True)
    alpha, beta, k = 1.3, 0.4, 0.3

    def fused(a, b, hh, r):
        if magnitude.startswith("given"):
            return ops._DecoupledProduct.apply(a, b, hh if magnitude == "given_tensor" else 0.7, None, "given",
                                               alpha, beta, angular, k, 1e-6, 1e-6)
        return ops._DecoupledProduct.apply(a, b, None, r, magnitude, alpha, beta, angular, k, 1e-6, 1e-6)

    def plain(a, b, hh, r):
        g = _plain_angle(a, b, angular, k)
        if magnitude == "given_tensor":
            return hh * g
        if magnitude == "given_float":
            return 0.7 * g
        return magnitude_function(b, magnitude, alpha, r, beta) * g

    args = (inner, xn, h, rho)
    got, ref = fused(*args), plain(*args)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    gy = torch.randn(ref.shape, dtype=D, generator=gen)
    for a, b in zip(torch.autograd.grad(got, args, gy, allow_unused=True),
                    torch.autograd.grad(ref, args, gy, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(fused, args)


def test_fused_decoupled_float_radius_and_linear_layout():
    """A number as the radius (no radius gradient), and the fully connected layout incl. a 1-D input."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 4, 6, 6, dtype=D, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=D, generator=gen, requires_grad=True)
    for magnitude, angular in (("tanh", "cosine"), ("ball", "linear"), ("seg", "sqcos")):
        res = [decoupled_conv(x, w, None, 1, 1, magnitude=magnitude, angular=angular, rho=1.5, beta=0.3, fast=f)
               for f in (True, False)]
        torch.testing.assert_close(res[0], res[1], atol=1e-12, rtol=0)
        ga = torch.autograd.grad(res[0].square().sum(), (x, w))
        gb = torch.autograd.grad(res[1].square().sum(), (x, w))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    wl = torch.randn(5, 8, dtype=D, generator=gen, requires_grad=True)
    rho = (torch.rand(5, dtype=D, generator=gen) + 0.5).requires_grad_(True)
    for xl in (torch.randn(3, 8, dtype=D, generator=gen), torch.randn(8, dtype=D, generator=gen)):
        xl.requires_grad_(True)
        for magnitude, angular in (("tanh", "cosine"), ("seg", "linear"), ("ball", "sigmoid"), ("log", "sqcos")):
            res = [decoupled_linear(xl, wl, None, magnitude, angular, rho=rho, beta=0.3, k=0.4, fast=f)
                   for f in (True, False)]
            torch.testing.assert_close(res[0], res[1], atol=1e-12, rtol=0)
            ga = torch.autograd.grad(res[0].square().sum(), (xl, wl, rho), allow_unused=True)
            gb = torch.autograd.grad(res[1].square().sum(), (xl, wl, rho), allow_unused=True)
            for a, b in zip(ga, gb):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("magnitude", ["ball", "seg"])
def test_decoupled_product_kink_ties_follow_the_composition(magnitude):
    """At ||x|| == rho exactly (ball: ||x|| / rho == 1) the gradients follow autograd's: clamp_max / clamp_min give 0
    (the right branch), SegConv's torch.where(xn <= rho, ...) the left branch."""
    xn = torch.tensor([[[[0.5, 1.0, 2.0]]]], dtype=D, requires_grad=True)
    inner = (torch.tensor([[[[0.3, -0.4, 0.9]], [[0.2, 0.1, -0.7]]]], dtype=D) * xn.detach()).requires_grad_(True)
    rho = torch.tensor([1.0, 2.0], dtype=D).view(1, 2, 1, 1).requires_grad_(True)
    args = (inner, xn, rho)
    with torch.no_grad():
        inner[0, 1, 0, 0] = 0.0  # relu_cos: c == 0
    for angular in ("cosine", "linear", "relu_cos"):
        got = ops._DecoupledProduct.apply(inner, xn, None, rho, magnitude, 1.3, 0.4, angular, None, 1e-6, 1e-6)
        ref = magnitude_function(xn, magnitude, 1.3, rho, 0.4) * _plain_angle(inner, xn, angular, None)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad(got.sum(), args), torch.autograd.grad(ref.sum(), args)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("nd,ks,padding,dilation,groups", [
    (2, (3, 3), 1, 1, 1), (2, (3, 2), (0, 1), (2, 1), 2), (1, (3,), 2, 2, 1), (3, (3, 3, 3), 1, 1, 2),
])
def test_conv_and_patch_sums_match_plain_autograd(nd, ks, padding, dilation, groups):
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(2, 4, *([6] * nd), dtype=D, generator=gen, requires_grad=True)
    w = torch.randn(6, 4 // groups, *ks, dtype=D, generator=gen, requires_grad=True)
    pad, dil = ops._tuple(padding, nd), ops._tuple(dilation, nd)
    back = ops._transposed_padding(nd, ks, 1, padding, dilation)

    def fused(xx, ww):
        return ops._ConvAndPatchSums.apply(xx, ww, pad, dil, groups, back)

    def plain(xx, ww):
        return (ops._CONV[nd](xx, ww, None, 1, padding, dilation, groups),
                _plain_square_sums(xx, ks, 1, padding, dilation, groups))

    got, ref = fused(x, w), plain(x, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    gys = [torch.randn(r.shape, dtype=D, generator=gen) for r in ref]
    for used in ((0, 1), (0,), (1,)):  # both outputs, only the convolution, only the patch sums
        ga = torch.autograd.grad([got[i] for i in used], (x, w), [gys[i] for i in used], allow_unused=True,
                                 retain_graph=True)
        gb = torch.autograd.grad([ref[i] for i in used], (x, w), [gys[i] for i in used], allow_unused=True,
                                 retain_graph=True)
        for a, b in zip(ga, gb):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    small = (x[:1, :, *([slice(0, 5)] * nd)].detach().requires_grad_(True), w.detach().requires_grad_(True))
    assert torch.autograd.gradcheck(fused, small)
    if nd == 2:
        assert torch.autograd.gradgradcheck(fused, small)


def test_normalized_conv_uses_the_fused_node_only_where_it_applies():
    x = torch.randn(2, 4, 6, 6, dtype=D, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=D, requires_grad=True)
    inner, xn, _ = ops.normalized_conv(x, w, 1, 1, 1, 2)
    assert type(inner.grad_fn).__name__ == "_ConvAndPatchSumsBackward"
    torch.testing.assert_close(xn, patch_norms(x, 3, 1, 1, 1, 2), atol=1e-12, rtol=0)
    for args in ((2, 1, 1, 2), (1, "same", 1, 2)):  # strided / string padding: two separate convolutions
        inner, xn, _ = ops.normalized_conv(x, w, *args)
        assert type(inner.grad_fn).__name__ == "ConvolutionBackward0"
        torch.testing.assert_close(xn, patch_norms(x, 3, *args), atol=1e-12, rtol=0)


@pytest.mark.parametrize("xn_channels", [1, 3])
def test_cosine_from_parts_matches_plain_autograd(xn_channels):
    gen = torch.Generator().manual_seed(19)
    xn = (torch.rand(2, xn_channels, 4, 4, dtype=D, generator=gen) + 0.5).requires_grad_(True)
    inner = torch.randn(2, 3, 4, 4, dtype=D, generator=gen, requires_grad=True)
    got, ref = ops._CosineFromParts.apply(inner, xn), inner * xn.reciprocal()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    gy = torch.randn(ref.shape, dtype=D, generator=gen)
    for a, b in zip(torch.autograd.grad(got, (inner, xn), gy), torch.autograd.grad(ref, (inner, xn), gy)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    small = (inner[:1, :, :2, :2].detach().requires_grad_(True), xn[:1, :, :2, :2].detach().requires_grad_(True))
    assert torch.autograd.gradcheck(ops._CosineFromParts.apply, small)
    assert torch.autograd.gradgradcheck(ops._CosineFromParts.apply, small)


def test_sphere_linear_learnable_k_unbatched_input():
    """A 1-D input: the k-gradient's sums reduce nothing (the scratch buffer must not be the result)."""
    gen = torch.Generator().manual_seed(20)
    w = torch.randn(5, 8, dtype=D, generator=gen, requires_grad=True)
    k = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.1], dtype=D, requires_grad=True)
    for x in (torch.randn(8, dtype=D, generator=gen), torch.randn(3, 8, dtype=D, generator=gen)):
        x.requires_grad_(True)
        got = sphere_linear(x, w, None, "learnable", k)
        inner, xn, _ = ops.linear_parts(x, w)
        ref = _plain_angle(inner, xn, "sigmoid", k)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad(got.square().sum(), (x, w, k)),
                        torch.autograd.grad(ref.square().sum(), (x, w, k))):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
