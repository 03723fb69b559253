"""DecoupledConv1d/2d and DecoupledLinear modules: radius normalization, learnable parts, invariants, errors."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_circles
from torch import nn

from lightning_hyper.functional.operators import MAGNITUDE_FNS, decoupled_conv, patch_norms
from lightning_hyper.nn import DecoupledConv1d, DecoupledConv2d, DecoupledConv3d, DecoupledLinear
from lightning_hyper.nn.decoupled import debiased_weight
from tests.functional.test_operators import ref_g, ref_h

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_subclass_and_state_dict_keys():
    m = DecoupledConv2d(3, 4, 3, magnitude="tanh")
    assert isinstance(m, nn.Conv2d) and m.hyperspherical_layer
    assert set(m.state_dict()) == {"weight", "radius_raw", "patch_norm_mean", "num_batches_tracked"}
    assert set(DecoupledConv2d(3, 4, 3, magnitude="linear").state_dict()) == {"weight"}
    assert isinstance(DecoupledLinear(3, 4), nn.Linear) and isinstance(DecoupledConv1d(3, 4, 3), nn.Conv1d)


def ref_conv3d_parts(x, w, stride, padding, dilation, groups, eps=1e-4):
    """Explicit loops over samples, output channels and output voxels (float64, zero padding):
    per patch the dot product with the normalized kernel's direction, ||x_patch|| and ||w||."""
    x, w = x.numpy(), w.numpy()
    n, c_in = x.shape[:2]
    c_out, cg = w.shape[0], w.shape[1]
    og = c_out // groups
    xp = np.pad(x, [(0, 0), (0, 0)] + [(padding[i], padding[i]) for i in range(3)])
    out_sz = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
              for i in range(3)]
    cos = np.zeros((n, c_out, *out_sz))
    xn = np.zeros_like(cos)
    wn = np.sqrt((w.reshape(c_out, -1) ** 2).sum(1) + eps)
    for b, o, i, j, k in itertools.product(range(n), range(c_out), *(range(s) for s in out_sz)):
        g = o // og
        dot = sq = 0.0
        for c, a1, a2, a3 in itertools.product(range(cg), *(range(s) for s in w.shape[2:])):
            v = xp[b, g * cg + c, i * stride[0] + a1 * dilation[0], j * stride[1] + a2 * dilation[1],
                   k * stride[2] + a3 * dilation[2]]
            dot += w[o, c, a1, a2, a3] * v
            sq += v * v
        xn[b, o, i, j, k] = math.sqrt(sq + eps)
        cos[b, o, i, j, k] = dot / (xn[b, o, i, j, k] * wn[o])
    return cos, xn, wn


@pytest.mark.parametrize("magnitude", MAGNITUDE_FNS)
@pytest.mark.parametrize("angular,k", [("linear", None), ("cosine", None), ("sigmoid", 0.4), ("sqcos", None)])
def test_conv3d_matches_explicit_loops(magnitude, angular, k):
    """DecoupledConv3d (train mode: rho' = rho * batch mean of ||x||) vs per-voxel loops, stride/padding/
    dilation/groups mixed per axis."""
    gen = torch.Generator().manual_seed(3)
    conv_args = dict(stride=(2, 1, 2), padding=(1, 0, 1), dilation=(1, 2, 1), groups=2)
    m = DecoupledConv3d(4, 4, 2, magnitude=magnitude, angular=angular, sigmoid_k=k or 0.3, alpha=1.5, seg_beta=0.5,
                        mix_log_weight=0.7, radius_init=0.8, radius_norm_momentum=0.1, **conv_args).double()
    assert isinstance(m, nn.Conv3d)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, dtype=D, generator=gen))
    x = torch.randn(2, 4, 4, 5, 4, dtype=D, generator=gen)
    cos, xn, wn = ref_conv3d_parts(x, m.weight.detach(), *conv_args.values())
    rho = None
    if m.has_radius:
        per_group = xn[:, ::2]  # the two output channels of a group share one patch norm
        rho = m.radius.detach().numpy().reshape(1, -1, 1, 1, 1) * per_group.mean()
    beta = 0.5 if magnitude == "seg" else 0.7
    ref = ref_h(xn, magnitude, 1.5, rho, beta) * ref_g(np.arccos(np.clip(cos, -1, 1)), angular, k)
    torch.testing.assert_close(m(x), torch.as_tensor(ref), atol=1e-10, rtol=0)
    if m.has_radius:  # the running mean got the batch mean; eval mode uses it
        assert float(m.patch_norm_mean) == pytest.approx(xn[:, ::2].mean(), rel=1e-12)
        m.eval()
        torch.testing.assert_close(m(x), torch.as_tensor(ref), atol=1e-10, rtol=0)


def test_conv3d_gradcheck_and_state_dict():
    m = DecoupledConv3d(2, 2, 2, stride=2, padding=1, magnitude="tanh", angular="sigmoid", learn_k=True).double()
    assert set(m.state_dict()) == {"weight", "radius_raw", "k_raw", "patch_norm_mean", "num_batches_tracked"}
    x = torch.randn(1, 2, 3, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    m(x).sum().backward()
    assert m.radius_raw.grad.abs().sum() > 0 and m.k_raw.grad.abs().sum() > 0


def test_train_mode_uses_batch_mean_and_eval_uses_running_mean():
    m = DecoupledConv2d(2, 3, 3, padding=1, stride=2, magnitude="tanh", radius_init=0.7,
                        radius_norm_momentum=0.1).double()
    x = torch.randn(4, 2, 7, 7, dtype=D)
    xn = patch_norms(x, 3, 2, 1, 1, 1)  # patch norms of the layer's own patches
    rho = torch.full((3,), 0.7, dtype=D)
    out = m(x)
    # independent formula: alpha * tanh(||x|| / (rho * mean||x||)) * cos
    w_norm = torch.sqrt(m.weight.detach().pow(2).sum((1, 2, 3)) + 1e-4).view(-1, 1, 1, 1)
    inner = F.conv2d(x, m.weight.detach() / w_norm, None, 2, 1)
    rho_used = m.radius.detach().view(1, -1, 1, 1)  # 0.7 up to the float32 rounding of radius_raw
    ref = torch.tanh(xn / (rho_used * xn.mean())) * inner / xn
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(m.radius.detach(), rho)
    rho = m.radius.detach()
    # first batch copied into the running mean, then the zero-debiased EMA with momentum 0.1:
    # (0.1 * 0.9 * x1 + 0.1 * x2) / (1 - 0.9^2), not the biased 0.9 * x1 + 0.1 * x2
    torch.testing.assert_close(m.patch_norm_mean, xn.mean())
    x2 = 3 * torch.randn(4, 2, 7, 7, dtype=D)
    m(x2)
    ema = (0.09 * xn.mean() + 0.1 * patch_norms(x2, 3, 2, 1, 1, 1).mean()) / 0.19
    torch.testing.assert_close(m.patch_norm_mean, ema)
    assert int(m.num_batches_tracked) == 2
    m.eval()
    torch.testing.assert_close(
        m(x), decoupled_conv(x, m.weight.detach(), None, 2, 1, 1, 1, "tanh", rho=rho, radius_scale=ema),
        atol=1e-12, rtol=0
    )
    torch.testing.assert_close(m.patch_norm_mean, ema)  # no update in eval


@pytest.mark.parametrize("momentum", [1e-3, 1e-2])
def test_running_mean_is_zero_debiased(momentum):
    """After 500 batches each batch keeps its geometric share (1-b) b^(500-k) / (1-b^500) of the eval-mode
    radius average (b = 1 - momentum), as the original code's zero-debiased moving average: with the
    default 1e-3 the first batch holds 0.15 %, not the 61 % of an EMA started from the first batch."""
    m = DecoupledLinear(3, 2, magnitude="ball", radius_norm_momentum=momentum).double()
    b, t = 1 - momentum, 500
    ones = torch.ones(1, 3, dtype=D)
    m(100.0 * ones)  # batch 1: a large patch norm, then 499 batches of one small patch norm
    big = float(m.last_patch_norm_mean)
    for _ in range(t - 1):
        m(0.0 * ones)
    small = float(m.last_patch_norm_mean)
    first_share = (float(m.patch_norm_mean) - small) / (big - small)
    expected = (1 - b) * b ** (t - 1) / (1 - b ** t)
    assert first_share == pytest.approx(expected, rel=1e-6, abs=0)
    assert first_share != pytest.approx(b ** (t - 1), rel=1e-2, abs=0)  # the biased EMA started from batch 1
    assert debiased_weight(momentum, 1) == 1.0 and debiased_weight(0.0, 4) == 0.25


def test_running_mean_converges_to_true_patch_norm_mean():
    m = DecoupledConv2d(3, 4, 3, padding=1, magnitude="ball", radius_norm_momentum=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        m(2.0 * torch.randn(16, 3, 8, 8, generator=gen))
    big = 2.0 * torch.randn(2000, 3, 8, 8, generator=gen)
    true = patch_norms(big, 3, 1, 1, 1, 1).mean()
    assert abs(float(m.patch_norm_mean) / float(true) - 1) < 0.02


@pytest.mark.parametrize("param", ["square", "softplus", "exp"])
@pytest.mark.parametrize("granularity,shape", [("channel", (5,)), ("layer", (1,))])
def test_radius_parametrizations_init_and_learn(param, granularity, shape):
    m = DecoupledConv2d(2, 5, 3, magnitude="tanh", radius_init=1.7, radius_param=param,
                        radius_granularity=granularity).double()
    assert m.radius_raw.shape == shape
    torch.testing.assert_close(m.radius.detach(), torch.full(shape, 1.7, dtype=D))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = m.radius.detach().clone()
    m(torch.randn(3, 2, 6, 6, dtype=D)).pow(2).mean().backward()
    assert m.radius_raw.grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(m.radius.detach(), before)


def test_fixed_radius_is_buffer():
    m = DecoupledConv2d(2, 5, 3, magnitude="seg", learn_radius=False)
    assert "radius_raw" not in dict(m.named_parameters()) and "radius_raw" in m.state_dict()


def test_radius_gradient_depends_on_side_of_the_radius():
    x = torch.randn(8, 2, 6, 6, dtype=D)
    for magnitude, inside_grad in (("ball", True), ("seg", False)):
        for rho0, expect in ((1e3, inside_grad), (1e-3, not inside_grad)):
            m = DecoupledConv2d(2, 3, 3, magnitude=magnitude, radius_init=rho0, radius_norm=False,
                                angular="linear").double()
            m(x).sum().backward()
            assert (m.radius_raw.grad.abs().sum() > 0) == expect, (magnitude, rho0)


def test_learnable_angular_k():
    for kw in ({"angular": "learnable"}, {"angular": "sigmoid", "learn_k": True}):
        m = DecoupledConv2d(2, 4, 3, magnitude="sphere", **kw)
        assert m.angular == "sigmoid" and m.k_raw.shape == (4,)
        m(torch.randn(2, 2, 5, 5)).square().sum().backward()
        assert m.k_raw.grad.abs().sum() > 0
    assert DecoupledConv2d(2, 4, 3, angular="sigmoid").k == 0.3


def test_aliases_and_repr():
    m = DecoupledConv2d(2, 4, 3, magnitude="TanhConv", angular="square_cosine")
    assert (m.magnitude, m.angular) == ("tanh", "sqcos")
    assert "magnitude='tanh'" in repr(m)


@pytest.mark.parametrize("magnitude", ["sphere", "ball", "tanh"])
def test_bounded_in_train_and_eval(magnitude):
    m = DecoupledConv2d(3, 4, 3, padding=1, magnitude=magnitude, alpha=1.5, radius_norm_momentum=0.5)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        for s in (1e-3, 1.0, 1e3):
            assert m(s * torch.randn(2, 3, 6, 6)).abs().max() <= 1.5 + 1e-6


def test_input_scale_behaviour_with_radius_norm_in_train_mode():
    x = torch.rand(4, 2, 6, 6, dtype=D) + 0.1
    for magnitude, expected in (("ball", 1.0), ("tanh", 1.0), ("sphere", 1.0), ("seg", 7.0), ("linear", 7.0)):
        m = DecoupledConv2d(2, 3, 3, magnitude=magnitude, angular="linear", eps=0.0).double()
        torch.testing.assert_close(m(7 * x), expected * m(x), atol=1e-9, rtol=1e-9)
    m = DecoupledConv2d(2, 3, 3, magnitude="log", eps=0.0).double()
    ratio = (m(7 * x) / m(x)).median()
    assert 1.2 < ratio < 6.0  # log is not homogeneous
    m = DecoupledConv2d(2, 3, 3, magnitude="tanh", eps=0.0).double()
    m(x)
    m.eval()
    assert not torch.allclose(m(7 * x), m(x))  # frozen E||x|| in eval: no longer scale invariant


def test_decoupled_linear_batch_mean_and_weighted():
    m = DecoupledLinear(4, 3, magnitude="tanh", weighted="nonlinear_separate", eps=0.0).double()
    x = torch.randn(6, 4, dtype=D)
    out = m(x)
    w = m.weight.detach()
    xn, wn = x.norm(dim=1, keepdim=True), w.norm(dim=1)
    rho = m.radius.detach()
    ref = torch.tanh(wn / rho) * torch.tanh(xn / (rho * xn.mean())) * (x @ w.T) / (xn * wn)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_kernel_norms_grow_under_plain_sgd():
    """Eq. 4.17: the gradient is orthogonal to w, so ||w_{t+1}||^2 = ||w_t||^2 + lr^2 ||grad||^2."""
    torch.manual_seed(0)
    m = DecoupledConv2d(2, 4, 3, magnitude="sphere", angular="cosine", eps=0.0).double()
    x = torch.randn(8, 2, 6, 6, dtype=D)
    target = torch.randn(8, 4, 4, 4, dtype=D)
    start = m.weight.detach().flatten(1).norm(dim=1).mean()
    for _ in range(30):
        m.weight.grad = None
        (m(x) - target).pow(2).mean().backward()
        g = m.weight.grad.flatten(1)
        before = m.weight.detach().flatten(1).pow(2).sum(1)
        with torch.no_grad():
            m.weight -= 0.5 * m.weight.grad
        after = m.weight.detach().flatten(1).pow(2).sum(1)
        torch.testing.assert_close(after, before + 0.25 * g.pow(2).sum(1), rtol=1e-9, atol=0)
    assert m.weight.detach().flatten(1).norm(dim=1).mean() > start


def _circles_accuracy(magnitude: str, seed: int) -> float:
    x, y = make_circles(500, noise=0.05, factor=0.5, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(seed)
    kw = dict(magnitude=magnitude, angular="cosine", radius_norm_momentum=0.1)
    net = nn.Sequential(DecoupledLinear(2, 32, **kw), nn.ReLU(), DecoupledLinear(32, 32, **kw), nn.ReLU(),
                        nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(x[:300]), y[:300]).backward()
        opt.step()
    net.eval()
    return float((net(x[300:]).argmax(1) == y[300:]).float().mean())


def test_magnitude_matters_on_circles():
    """DCNet spec T15: the class lives in ||x||; SphereConv discards it, Linear/TanhConv keep it."""
    assert _circles_accuracy("linear", 0) >= 0.95
    assert _circles_accuracy("tanh", 0) >= 0.95
    assert _circles_accuracy("sphere", 0) <= 0.75


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"magnitude='cube'.*accepted values.*'ball'"):
        DecoupledConv2d(2, 3, 3, magnitude="cube")
    with pytest.raises(ValueError, match=r"angular='tan'.*accepted values.*'sqcos'"):
        DecoupledLinear(2, 3, angular="tan")
    with pytest.raises(ValueError, match=r"weighted='nonlinear_joint' is not supported; "
                                         r"accepted values: 'none', 'linear'.*magnitude='tanh'"):
        DecoupledConv2d(2, 3, 3, magnitude="seg", weighted="nonlinear_joint")
    with pytest.raises(ValueError, match=r"weighted='quadratic'.*accepted values"):
        DecoupledConv2d(2, 3, 3, weighted="quadratic")
    for kw, word in [({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
                     ({"radius_init": 0.0}, "radius_init"), ({"radius_init": -1.0}, "radius_init"),
                     ({"seg_beta": -0.1, "magnitude": "seg"}, "seg_beta"),
                     ({"sigmoid_k": 0.0, "angular": "sigmoid"}, "sigmoid_k"),
                     ({"sigmoid_k": 0.01, "angular": "learnable"}, "sigmoid_k"),
                     ({"radius_norm_momentum": 1.5}, "radius_norm_momentum"), ({"eps": -1e-4}, "eps")]:
        with pytest.raises(ValueError, match=word):
            DecoupledConv2d(2, 3, 3, **kw)
    with pytest.raises(ValueError, match=r"radius_param='log'.*square"):
        DecoupledConv2d(2, 3, 3, radius_param="log")
    DecoupledConv2d(2, 3, 3, magnitude="mix", alpha=0.0)  # alpha = 0 is allowed for MixConv (pure log)
