"""convert(model, operator=...): in-place replacement with copied weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hyper.nn as lhnn
from lightning_hyper.functional.operators import sphere_conv, sphere_linear
from lightning_hyper.nn import DecoupledConv2d, DecoupledLinear, SphereConv1d, SphereConv2d, SphereLinear, convert
from lightning_hyper.nn.convert import plan_convert


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
    from lightning_hyper.functional.operators import decoupled_conv
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


# ---------------------------------------------------------------------------------------------- selection (core)
class ThreeFC(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_exclude_string_is_one_pattern_not_its_characters():
    net = convert(ThreeFC(), "sphere", exclude="fc1")
    assert type(net.fc1) is nn.Linear and type(net.fc2) is SphereLinear and type(net.out) is nn.Linear
    net = convert(ThreeFC(), "sphere", include="fc*", output_layer="none")
    assert [type(m) for m in (net.fc1, net.fc2, net.out)] == [SphereLinear, SphereLinear, nn.Linear]


def test_deprecated_argument_names_still_work_and_map_to_the_new_ones():
    with pytest.warns(DeprecationWarning, match=r"convert\(keep_classifier=False\) is deprecated.*output_layer='none'"):
        net = convert(Net(), "sphere", keep_classifier=False)
    assert type(net.classifier) is SphereLinear
    with pytest.warns(DeprecationWarning, match=r"convert\(classifier='fc'\) is deprecated; use output_layer="):
        net = convert(Net(), "sphere", classifier="fc")
    assert type(net.fc) is nn.Linear and type(net.classifier) is SphereLinear
    with pytest.raises(ValueError, match=r"classifier= \(deprecated\) and output_layer= were both given"):
        convert(Net(), "sphere", classifier="fc", output_layer="fc")
    with pytest.raises(ValueError, match=r"keep_classifier= \(deprecated\) and output_layer= were both given"):
        convert(Net(), "sphere", keep_classifier=True, output_layer="fc")


def test_plan_and_errors_name_what_stays_plain():
    plan = plan_convert(Net(), "sphere")
    assert plan.names == ["conv1", "block.0", "fc"]
    reasons = dict(plan.skipped)
    assert reasons["short"].startswith("1x1 convolution") and reasons["classifier"].startswith("output layer")
    assert reasons["up"] == "cannot transform: type ConvTranspose2d has no sphere counterpart"
    with pytest.raises(TypeError, match=r"include='up' selects 'up' of type ConvTranspose2d, which convert cannot"):
        convert(Net(), "sphere", include="up")
    with pytest.raises(ValueError, match=r"include='classifier' selects only the output layer"):
        convert(Net(), "sphere", include="classifier")
    with pytest.raises(ValueError, match="root module"):
        convert(nn.Linear(3, 3), "sphere", output_layer="none")
    with pytest.raises(ValueError, match=r"no Conv/Linear layer.*output_layer='none'"):
        convert(nn.Sequential(nn.Linear(3, 3)), "sphere")


def test_weights_are_the_same_parameters_and_an_optimizer_keeps_working():
    torch.manual_seed(0)
    net = ThreeFC()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w = net.fc2.weight
    convert(net, "sphere")
    assert net.fc2.weight is w and any(p is w for p in opt.param_groups[0]["params"])
    net(torch.randn(3, 4)).sum().backward()
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w.detach(), before)


def test_torch_geometric_linear_is_converted():
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    convs = nn.ModuleList([GCNConv(8, 6), GCNConv(6, 3)])
    x, ei = torch.randn(5, 8), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    w = convs[0].lin.weight
    convert(convs, "sphere")  # convs.1.lin is the output layer (last Linear-like)
    assert type(convs[0].lin) is SphereLinear and convs[0].lin.weight is w
    assert type(convs[1].lin).__name__ == "Linear"
    # GCNConv(x) = propagate(lin(x)) + bias: with an identity lin the same propagation gives the expected output
    ident = GCNConv(6, 6)
    with torch.no_grad():
        ident.lin.weight.copy_(torch.eye(6))
        ident.bias.copy_(convs[0].bias)
        expected = ident(sphere_linear(x, w, None, "cosine"), ei)
        torch.testing.assert_close(convs[0](x, ei), expected, rtol=0, atol=1e-6)
