"""SphereConv1d/2d/3d, SphereLinear, SphereNorm modules: wiring, learnable k, SphereNorm, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hyper.functional.neurons import as_neurons
from lightning_hyper.nn import (
    SphereConv1d,
    SphereConv2d,
    SphereConv3d,
    SphereLinear,
    SphereNorm,
    make_shared_k,
)

D = torch.float64


def unfold_cos(x, w, stride=1, padding=0, dilation=1, eps=1e-4):
    """cos(theta) per (n, filter, location) from explicit patches (groups = 1)."""
    u = F.unfold(x, w.shape[2:], dilation=dilation, padding=padding, stride=stride)  # (N, d, L)
    wf = w.flatten(1)
    dot = torch.einsum("od,ndl->nol", wf, u)
    return dot / torch.sqrt(u.pow(2).sum(1, keepdim=True) + eps) / torch.sqrt(wf.pow(2).sum(1) + eps)[None, :, None]


def test_subclasses_and_state_dict_of_torch_layers():
    for cls, base, args in [
        (SphereConv1d, nn.Conv1d, (3, 4, 3)), (SphereConv2d, nn.Conv2d, (3, 4, 3)),
        (SphereConv3d, nn.Conv3d, (3, 4, 3)), (SphereLinear, nn.Linear, (3, 4)), (SphereNorm, nn.Conv2d, (3, 4, 3)),
    ]:
        m = cls(*args)
        assert isinstance(m, base) and m.hyperspherical_layer
        assert set(m.state_dict()) == set(base(*args, bias=False).state_dict())
        assert m.bias is None  # bias-free by default (BN follows)
        assert as_neurons(m.weight).shape[0] == 4  # the energy callbacks still see the neurons


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_conv2d_module_matches_unfold_with_padding_modes(padding_mode):
    m = SphereConv2d(3, 5, 3, stride=2, padding=1, padding_mode=padding_mode, angle_fn="linear").double()
    x = torch.randn(2, 3, 7, 7, dtype=D)
    xp = x if padding_mode == "zeros" else F.pad(x, (1, 1, 1, 1), mode=padding_mode)
    cos = unfold_cos(xp, m.weight.detach(), stride=2, padding=1 if padding_mode == "zeros" else 0)
    ref = 1 - 2 * torch.acos(cos) / math.pi
    torch.testing.assert_close(m(x).flatten(2), ref, atol=1e-10, rtol=0)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_same_padding_and_bias():
    m = SphereConv2d(2, 3, 4, padding="same", bias=True).double()
    nn.init.normal_(m.bias)
    x = torch.randn(1, 2, 6, 6, dtype=D)
    out = m(x)
    assert out.shape == (1, 3, 6, 6)
    # padding="same" with an even kernel pads (1, 2) on each axis, as nn.Conv2d does
    cos = unfold_cos(F.pad(x, (1, 2, 1, 2)), m.weight.detach())
    torch.testing.assert_close(out.flatten(2), cos + m.bias.detach()[None, :, None], atol=1e-10, rtol=0)


def test_conv1d_and_linear_modules():
    m = SphereConv1d(2, 3, 3, padding=1, dilation=2, angle_fn="sigmoid", k=0.7).double()
    x = torch.randn(2, 2, 9, dtype=D)
    cos = unfold_cos(x[:, :, None], m.weight.detach()[:, :, None], padding=(0, 1), dilation=(1, 2))
    e = torch.tanh((math.pi / 2 - torch.acos(cos)) / 1.4) / math.tanh(math.pi / 2.8)
    torch.testing.assert_close(m(x), e.view(2, 3, -1), atol=1e-10, rtol=0)
    lin = SphereLinear(6, 4, angle_fn="cosine", eps=0.0).double()
    v = torch.randn(5, 6, dtype=D)
    torch.testing.assert_close(lin(v), F.normalize(v, dim=1) @ F.normalize(lin.weight.detach(), dim=1).T)


def test_full_kernel_conv_equals_sphere_linear_module():
    conv = SphereConv2d(3, 4, 5, angle_fn="linear").double()
    lin = SphereLinear(75, 4, angle_fn="linear").double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.flatten(1))
    x = torch.randn(6, 3, 5, 5, dtype=D)
    torch.testing.assert_close(conv(x).flatten(1), lin(x.flatten(1)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("cls,args,shape", [(SphereConv2d, (2, 3, 3), (4, 2, 6, 6)), (SphereLinear, (5, 3), (4, 5))])
def test_learnable_k_learns_and_stays_above_k_min(cls, args, shape):
    m = cls(*args, angle_fn="learnable")
    assert m.k_raw.shape == (3,)
    torch.testing.assert_close(m.k, torch.full((3,), 0.5))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(shape)
    before = m.k.detach().clone()
    loss = m(x).square().mean()
    loss.backward()
    assert m.k_raw.grad is not None and m.k_raw.grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(m.k.detach(), before)
    with torch.no_grad():
        m.k_raw.copy_(torch.tensor([-3.0, 0.0, 2.0]))
    torch.testing.assert_close(m.k, torch.tensor([3.05, 0.05, 2.05]))
    assert torch.isfinite(m(x)).all()


def test_k_sharing_modes_parameter_counts():
    per_layer = SphereConv2d(2, 8, 3, angle_fn="learnable", k_sharing="per_layer", k=0.7)
    assert per_layer.k_raw.shape == (1,) and abs(float(per_layer.k.detach()) - 0.7) < 1e-6
    shared = make_shared_k(0.6)
    net = nn.Sequential(SphereConv2d(2, 4, 3, angle_fn="learnable", shared_k=shared),
                        SphereConv2d(4, 4, 3, angle_fn="learnable", shared_k=shared))
    ks = [n for n, _ in net.named_parameters() if "k_raw" in n]
    assert len(ks) == 1 and net[0].k_sharing == "per_network"
    out = net(torch.randn(2, 2, 7, 7)).sum()
    out.backward()
    assert shared.grad is not None and shared.grad.abs() > 0


def test_sphere_norm_is_batch_independent_unlike_batchnorm():
    torch.manual_seed(0)
    sn = SphereNorm(3, 4, 3, padding=1).train()
    bn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(sn(x[:1]), sn(x)[:1])
    assert not torch.allclose(bn(x[:1].repeat(2, 1, 1, 1))[:1], bn(x)[:1], atol=1e-3)
    assert sn(100 * x).abs().max() <= 1.0


def test_sphere_norm_affine_learned_and_fixed():
    m = SphereNorm(2, 3, 3, affine=True).double()
    with torch.no_grad():
        m.affine_scale.copy_(torch.tensor([2.0, -1.0, 0.5]))
        m.affine_shift.copy_(torch.tensor([0.1, 0.2, 0.3]))
    plain = SphereConv2d(2, 3, 3).double()
    plain.load_state_dict({"weight": m.weight.detach()})
    x = torch.randn(2, 2, 5, 5, dtype=D)
    ref = plain(x) * torch.tensor([2.0, -1.0, 0.5], dtype=D).view(1, 3, 1, 1) + torch.tensor(
        [0.1, 0.2, 0.3], dtype=D).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), ref)
    assert {n for n, _ in m.named_parameters()} == {"weight", "affine_scale", "affine_shift"}
    fixed = SphereNorm(2, 3, 3, affine=True, affine_learnable=False, affine_init=(3.0, -1.0))
    assert {n for n, _ in fixed.named_parameters()} == {"weight"}
    assert set(fixed.state_dict()) == {"weight", "affine_scale", "affine_shift"}
    assert fixed(torch.randn(1, 2, 5, 5)).min() >= -4.0


def test_none_angle_fn_is_plain_conv_and_float64_and_3d():
    m = SphereConv2d(2, 3, 3, angle_fn="none", bias=True)
    ref = nn.Conv2d(2, 3, 3)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(m(x), ref(x))
    m3 = SphereConv3d(2, 3, 2, stride=2).double()
    out = m3(torch.randn(1, 2, 4, 4, 4, dtype=D))
    assert out.shape == (1, 3, 2, 2, 2) and out.dtype == D and out.abs().max() <= 1


def test_zero_input_gives_zero_output_and_finite_grads():
    for angle_fn in ("linear", "cosine", "sigmoid", "learnable"):
        m = SphereConv2d(2, 3, 3, padding=1, angle_fn=angle_fn)
        x = torch.zeros(1, 2, 4, 4, requires_grad=True)
        out = m(x)
        assert out.abs().max() == 0
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"angle_fn='tanh'.*accepted values.*learnable"):
        SphereConv2d(2, 3, 3, angle_fn="tanh")
    with pytest.raises(ValueError, match=r"k=.* is not supported; accepted values: a finite number > 0"):
        SphereConv2d(2, 3, 3, angle_fn="sigmoid", k=0)
    with pytest.raises(ValueError, match=r"k=.* is not supported; accepted values: a finite number > 0.05"):
        SphereLinear(2, 3, angle_fn="learnable", k=0.01)
    with pytest.raises(ValueError, match="k is only used"):
        SphereConv2d(2, 3, 3, angle_fn="cosine", k=0.3)
    with pytest.raises(ValueError, match=r"k_sharing='global'.*per_filter"):
        SphereConv2d(2, 3, 3, angle_fn="learnable", k_sharing="global")
    with pytest.raises(ValueError, match="shared_k"):
        SphereConv2d(2, 3, 3, angle_fn="learnable", k_sharing="per_network")
    with pytest.raises(TypeError, match="nn.Parameter"):
        SphereConv2d(2, 3, 3, angle_fn="learnable", shared_k=torch.ones(1))
    with pytest.raises(ValueError, match="eps"):
        SphereConv2d(2, 3, 3, eps=-1.0)
