"""CIFAR ResNet-20/32/56/110 (He et al., CVPR 2016, §4.2) and ResNet-18 (BasicBlock [2, 2, 2, 2]).

CIFAR ResNet-(6n+2): a 3x3 conv with 16 channels, three stages of n basic blocks
[3x3, c; 3x3, c] with c = 16, 32, 64 (times ``width``), the first block of stages 2 and 3 with
stride 2, then global average pooling. n = 3, 5, 9, 18 gives depth 20, 32, 56, 110
(0.27M, 0.46M, 0.85M, 1.7M parameters in He et al., Table 6). ``width=4`` gives the wide
ResNet-32 of the MHE experiments (64/128/256 channels, MHE Table D.2).

Shortcuts where the shape changes:
  * ``shortcut="B"`` (default): a 1x1 strided conv + BN projection. Every layer is then an
    ordinary Conv2d, which the energy callbacks can see and regularize (MHE spec §10.16), at the
    cost of ~2.7k extra parameters at width 1.
  * ``shortcut="A"``: the parameter-free identity of He et al. (stride-2 subsampling and zero
    channel padding); it reproduces the paper's parameter counts exactly.

ResNet-18: BasicBlocks [2, 2, 2, 2] with 64/128/256/512 channels and projection (B) shortcuts, as
torchvision's. ``cifar_stem=True`` (default) uses a 3x3 stride-1 conv stem with no max-pool for
32x32 inputs; ``cifar_stem=False`` uses the ImageNet stem (7x7 stride-2 conv, BN, ReLU, 3x3
stride-2 max-pool). All backbones end with global average pooling: output (B, out_features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hyper.functional.checks import check_choice, check_positive_int
from lightning_hyper.models.backbones import register_backbone

__all__ = ["BasicBlock", "CifarResNet", "ResNet18", "resnet18", "resnet20", "resnet32", "resnet56", "resnet110"]

_SHORTCUTS = ("A", "B")


class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """Residual block ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with two 3x3 convs."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = _PadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, shortcut)]
    layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _check_common(in_channels: int, shortcut: str) -> None:
    check_positive_int("in_channels", in_channels)
    check_choice("shortcut", shortcut, _SHORTCUTS)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2) with a ``width`` multiplier; output (B, 64 * width).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        width: channel multiplier of the 16/32/64 stages (4 = the MHE paper's wide ResNet-32).
        in_channels: input channels.
        shortcut: "B" (1x1 conv projection, default) or "A" (parameter-free zero padding).
    """

    def __init__(self, depth: int = 20, width: int = 1, in_channels: int = 3, shortcut: str = "B") -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer multiplier, got {width!r}")
        _check_common(in_channels, shortcut)
        n = (depth - 2) // 6
        planes = [16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(planes[0], planes[0], n, 1, shortcut)
        self.layer2 = _make_stage(planes[0], planes[1], n, 2, shortcut)
        self.layer3 = _make_stage(planes[1], planes[2], n, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = planes[2]
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock [2, 2, 2, 2], 64/128/256/512); output (B, 512).

    Args:
        in_channels: input channels.
        cifar_stem: True (default): 3x3 stride-1 conv stem without max-pool (32x32 inputs);
            False: the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool), as torchvision.
    """

    def __init__(self, in_channels: int = 3, cifar_stem: bool = True) -> None:
        super().__init__()
        _check_common(in_channels, "B")
        self.cifar_stem = cifar_stem
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(64, 64, 2, 1, "B")
        self.layer2 = _make_stage(64, 128, 2, 2, "B")
        self.layer3 = _make_stage(128, 256, 2, 2, "B")
        self.layer4 = _make_stage(256, 512, 2, 2, "B")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 512
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


@register_backbone("resnet20")
def resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3; 0.27M parameters)."""
    return CifarResNet(depth=20, **kwargs)


@register_backbone("resnet32")
def resnet32(**kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (n = 5; 0.46M parameters; ``width=4`` is the MHE paper's wide ResNet-32)."""
    return CifarResNet(depth=32, **kwargs)


@register_backbone("resnet56")
def resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9; 0.85M parameters)."""
    return CifarResNet(depth=56, **kwargs)


@register_backbone("resnet110")
def resnet110(**kwargs) -> CifarResNet:
    """CIFAR ResNet-110 (n = 18; 1.7M parameters)."""
    return CifarResNet(depth=110, **kwargs)


@register_backbone("resnet18")
def resnet18(**kwargs) -> ResNet18:
    """ResNet-18 with a CIFAR stem by default (``cifar_stem=False`` for the ImageNet stem)."""
    return ResNet18(**kwargs)
