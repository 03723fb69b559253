"""convert(model, operator=...): in-place replacement with copied weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hyper.nn as lhnn
from lightning_hyper.functional.sphere_ops import sphere_conv, sphere_linear
from lightning_hyper.nn import DecoupledConv2d, DecoupledLinear, SphereConv1d, SphereConv2d, SphereLinear, convert


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.short = nn.Conv2d(4, 6, 1, stride=2)
        self.up = nn.ConvTranspose2d(6, 6, 2)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn(self.conv1(x))
        h = self.block(h) + self.short(h)
        return self.classifier(self.fc(h.flatten(1)))


def test_sphere_conversion_copies_weights_and_keeps_classifier_and_1x1():
    torch.manual_seed(0)
    net = Net().double()
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    out = convert(net, "sphere", angle_fn="linear")
    assert out is net
    assert type(net.conv1) is SphereConv2d and net.conv1.angle_fn == "linear"
    assert net.conv1.padding_mode == "reflect" and net.conv1.bias is not None
    assert type(net.block[0]) is SphereConv2d and net.block[0].stride == (2, 2)
    assert type(net.fc) is SphereLinear
    assert type(net.classifier) is nn.Linear and type(net.short) is nn.Conv2d
    assert type(net.up) is nn.ConvTranspose2d
    assert net.conv1.weight.dtype == torch.float64
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    expected = sphere_conv(F.pad(x, (1, 1, 1, 1), mode="reflect"), ref["conv1.weight"], ref["conv1.bias"], 1, 0,
                           angle_fn="linear")
    torch.testing.assert_close(net.conv1(x), expected)
    h = torch.randn(2, 96, dtype=torch.float64)
    torch.testing.assert_close(net.fc(h), sphere_linear(h, ref["fc.weight"], ref["fc.bias"], "linear"))


def test_options_exclude_include_1x1_classifier():
    net = convert(Net(), "sphere", convert_1x1=True, output_layer="none", exclude=["block.*"])
    assert type(net.short) is SphereConv2d and type(net.classifier) is SphereLinear
    assert type(net.block[0]) is nn.Conv2d
    net = convert(Net(), "sphere", include=["fc", "conv*"])
    assert type(net.fc) is SphereLinear and type(net.conv1) is SphereConv2d and type(net.block[0]) is nn.Conv2d
    net = convert(Net(), "sphere", output_layer="fc")
    assert type(net.fc) is nn.Linear and type(net.classifier) is SphereLinear


def test_decoupled_conversion_and_magnitude_shortcut():
    net = convert(Net(), "tanh", angular="sqcos")
    assert type(net.conv1) is DecoupledConv2d and net.conv1.magnitude == "tanh" and net.conv1.angular == "sqcos"
    assert type(net.fc) is DecoupledLinear
    net = convert(Net(), "decoupled", magnitude="BallConv")
    assert net.block[0].magnitude == "ball"
    seq = convert(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2)), "sphere")
    assert type(seq[0]) is SphereConv1d
    # 3-D convolutions: both families, weights copied, same output as the functional operator
    conv3 = nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2).double()
    seq = convert(nn.Sequential(conv3, nn.Flatten(), nn.Linear(4, 2)), "decoupled", magnitude="linear",
                  angular="linear")
    assert type(seq[0]) is lhnn.DecoupledConv3d and seq[0].weight.equal(conv3.weight) and seq[0].groups == 2
    x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)
    from lightning_hyper.functional.sphere_ops import decoupled_conv
    torch.testing.assert_close(seq[0](x), decoupled_conv(x, conv3.weight, conv3.bias, 2, 1, 1, 2, "linear", "linear"))
    assert type(convert(nn.Sequential(nn.Conv3d(2, 4, 3), nn.Linear(4, 2)), "sphere")[0]) is lhnn.SphereConv3d


def test_weighted_linear_conv_conversion_reproduces_the_cnn():
    """DCNet §4.4.3 / T12: linearly weighted LinearConv + cos with eps = 0 is the original network."""
    torch.manual_seed(1)
    net = Net().double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    before = net(x)
    convert(net, "decoupled", magnitude="linear", weighted="linear", eps=0.0)
    assert type(net.conv1) is DecoupledConv2d
    torch.testing.assert_close(net(x), before)


def test_convert_errors():
    with pytest.raises(ValueError, match=r"operator='spherical'.*accepted values.*\['sphere', 'decoupled'\]"):
        convert(Net(), "spherical")
    with pytest.raises(ValueError, match=r"angle_fn='x'.*accepted values"):
        convert(Net(), "sphere", angle_fn="x")
    with pytest.raises(ValueError, match="matches no module"):
        convert(Net(), "sphere", include=["nothing*"])
    with pytest.raises(ValueError, match="classifier='head'"):
        convert(Net(), "sphere", classifier="head")
    with pytest.raises(ValueError, match="no Conv/Linear layer"):
        convert(nn.Sequential(nn.ReLU()), "sphere")
    with pytest.raises(ValueError, match="lazy"):
        convert(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)), "sphere")
    with pytest.raises(ValueError, match="conflicts"):
        convert(Net(), "tanh", magnitude="ball")
    with pytest.raises(TypeError, match="nn.Module"):
        convert("net", "sphere")
