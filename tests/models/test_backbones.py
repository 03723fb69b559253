"""Backbones: output shapes, out_features, parameter counts against published values."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_hyper.models import BACKBONES, CifarResNet, build_backbone
from lightning_hyper.models.backbones.cnn import PlainCNN


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_all_names_registered():
    build_backbone("cnn9")  # imports every backbone module
    for name in ("cnn6", "cnn9", "cnn15", "cnn1d", "resnet20", "resnet32", "resnet56", "resnet110", "resnet18"):
        assert name in BACKBONES


def test_unknown_backbone_lists_accepted_names():
    with pytest.raises(ValueError, match=r"backbone='vgg'.*accepted values.*cnn9"):
        build_backbone("vgg")


@pytest.mark.parametrize("name,k", [("cnn6", 2), ("cnn9", 3), ("cnn15", 5)])
def test_plain_cnn_structure_and_params(name, k):
    net = build_backbone(name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 3 * k and len(linears) == 1  # Table D.1: 3 stages of k convs, then FC-256
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert [c.out_channels for c in convs] == [64] * k + [128] * k + [256] * k
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    # independent closed-form count: 3x3 convs + BN(gamma, beta) + bias-free FC 4*4*256 -> 256
    chans = [3] + [64] * k + [128] * k + [256] * k
    conv = sum(9 * a * b for a, b in zip(chans[:-1], chans[1:]))
    bn = sum(2 * c for c in chans[1:])
    assert n_params(net) == conv + bn + 4 * 4 * 256 * 256
    assert net.out_features == 256
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 256)


def test_plain_cnn_digits_input_pools_down_to_1x1():
    net = build_backbone("cnn9", in_channels=1, input_size=8, widths=(8, 16, 32), fc_features=20)
    assert net.final_side == 1 and net.fc[1].in_features == 32
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 20) and net.out_features == 20
    # a 4x4 input keeps the map at 1x1 instead of failing in the third pool
    small = PlainCNN(blocks_per_stage=1, widths=(4, 4, 4), in_channels=1, input_size=4)
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.modules()) == 2
    assert small(torch.randn(2, 1, 4, 4)).shape == (2, 256)


def test_plain_cnn_fc_norm_act_and_widths():
    net = build_backbone("cnn6", widths=(16, 32, 64), fc_norm_act=True)
    assert isinstance(net.fc[-1], nn.ReLU) and isinstance(net.fc[-2], nn.BatchNorm1d)
    assert (net(torch.randn(4, 3, 32, 32)) >= 0).all()


def test_plain_cnn_bad_input():
    net = build_backbone("cnn6", widths=(4, 4, 4), in_channels=1, input_size=8)
    with pytest.raises(ValueError, match="input_size"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="widths"):
        build_backbone("cnn9", widths=())
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("cnn9", in_channels=0)


def test_cnn1d_shapes():
    net = build_backbone("cnn1d")
    assert net.final_length == 5 and net.out_features == 128
    assert net(torch.randn(3, 1, 40)).shape == (3, 128)
    assert net(torch.randn(3, 40)).shape == (3, 128)  # (B, L) accepted for one channel
    with pytest.raises(ValueError, match="input_length"):
        net(torch.randn(3, 1, 41))
    with pytest.raises(ValueError, match="kernel_size"):
        build_backbone("cnn1d", kernel_size=4)


# He et al. (2016), Table 6: 0.27M, 0.46M, 0.85M, 1.7M parameters (option A shortcuts, 10-class FC).
# Exact option-A totals (incl. the 64->10 FC with bias, 650 parameters) as counted by the widely
# used pytorch_resnet_cifar10 reimplementation: 269,722 / 464,154 / 853,018 / 1,727,962.
PAPER = {20: (0.27e6, 269_722), 32: (0.46e6, 464_154), 56: (0.85e6, 853_018), 110: (1.7e6, 1_727_962)}


@pytest.mark.parametrize("depth", sorted(PAPER))
def test_cifar_resnet_parameter_counts(depth):
    rounded, exact_a = PAPER[depth]
    fc = 64 * 10 + 10
    net_a = CifarResNet(depth=depth, shortcut="A")
    assert n_params(net_a) + fc == exact_a
    net_b = build_backbone(f"resnet{depth}")  # default option B adds two 1x1 conv+BN projections
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(net_b) + fc == exact_a + projections
    assert abs(n_params(net_b) + fc - rounded) / rounded < 0.03
    convs = [m for m in net_b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == depth - 1  # plus the FC layer = depth weighted layers


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_forward(shortcut):
    net = build_backbone("resnet20", shortcut=shortcut)
    assert net.out_features == 64
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_wide_resnet32_of_mhe_paper():
    net = build_backbone("resnet32", width=4)  # MHE Table D.2: 64/128/256 channels, 5 blocks each
    assert net.conv1.out_channels == 64 and net.out_features == 256
    assert [len(net.layer1), len(net.layer2), len(net.layer3)] == [5, 5, 5]
    assert net.layer3[0].conv1.stride == (2, 2)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 256)


def test_cifar_resnet_bad_args():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match=r"shortcut='C'.*accepted values"):
        CifarResNet(shortcut="C")
    with pytest.raises(ValueError, match="width"):
        CifarResNet(width=0)


def test_resnet18_imagenet_stem_matches_torchvision():
    ours = build_backbone("resnet18", cifar_stem=False).eval()
    ref = torchvision.models.resnet18(weights=None)
    ref.fc = nn.Identity()
    ref.load_state_dict(ours.state_dict())  # same parameter names and shapes (strict)
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x))
    assert n_params(ours) == n_params(torchvision.models.resnet18(weights=None)) - (512 * 1000 + 1000)


def test_resnet18_cifar_stem():
    net = build_backbone("resnet18")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and net.out_features == 512
    # torchvision's 11,689,512 minus the 1000-class FC, with a 3x3 instead of 7x7 stem
    assert n_params(net) == 11_689_512 - 513_000 - 3 * 64 * 49 + 3 * 64 * 9
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
