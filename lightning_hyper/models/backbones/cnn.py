"""Plain CNN-6/9/15 of the MHE experiments and a small 1-D CNN for MNIST-1D.

CNN-N (Liu et al., MHE, NeurIPS 2018, Table D.1; thesis §7.2)::

    Conv1.x  [3x3, w1] x k  -> 2x2 max-pool, stride 2
    Conv2.x  [3x3, w2] x k  -> 2x2 max-pool, stride 2
    Conv3.x  [3x3, w3] x k  -> 2x2 max-pool, stride 2
    FC       flatten -> fc_features                (the output layer lives in the classifier head)

with k = 2, 3, 5 for CNN-6, CNN-9, CNN-15 and widths (w1, w2, w3) = (64, 128, 256) by default
(Table 5.2 scales them, e.g. ``widths=(16, 32, 64)``). Every conv is bias-free and followed by
BatchNorm + ReLU; the FC layer is bias-free and, as in the authors' reference code (where it is a
4x4 VALID conv on the 4x4x256 map), has no BN/ReLU unless ``fc_norm_act=True``. Weights use He
("MSRA") normal initialization, std = sqrt(2 / fan_in).

Small inputs: ``input_size`` (the spatial side, 32 for CIFAR, 8 for sklearn digits) is given at
construction. A stage's max-pool is kept only while the map is at least 2x2, so it never shrinks
below 1x1 (8x8 digits: 8 -> 4 -> 2 -> 1; a 4x4 input skips the last pool). The FC layer sees
``widths[-1] * side**2`` inputs (4096 for CIFAR CNN-9, as in the paper, 256 for digits). The
forward pass checks the input size and raises a clear error on a mismatch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_hyper.functional.checks import check_positive_int, check_positive_ints
from lightning_hyper.models.backbones import register_backbone

__all__ = ["CNN1d", "PlainCNN", "cnn1d", "cnn6", "cnn9", "cnn15"]


def _he_init(module: nn.Module) -> None:
    """He/MSRA normal init (std = sqrt(2/fan_in)) for conv/linear weights, unit BN."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PlainCNN(nn.Module):
    """Plain CNN of the MHE paper (Table D.1): stages of [3x3 conv-BN-ReLU] x k, max-pool, FC.

    Args:
        blocks_per_stage: k, the number of 3x3 convs per stage (2, 3, 5 give CNN-6/9/15).
        widths: channels of each stage (default 64/128/256).
        in_channels: input channels (3 for CIFAR, 1 for digits).
        input_size: spatial side of the (square) input; fixes the FC input size.
        fc_features: output size of the FC layer (= ``out_features``), 256 in the paper.
        fc_norm_act: add BatchNorm1d + ReLU after the FC layer (the reference code has none).

    Input (B, in_channels, input_size, input_size) -> features (B, fc_features).
    """

    def __init__(
        self,
        blocks_per_stage: int = 3,
        widths: Sequence[int] = (64, 128, 256),
        in_channels: int = 3,
        input_size: int = 32,
        fc_features: int = 256,
        fc_norm_act: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("blocks_per_stage", blocks_per_stage),
            ("in_channels", in_channels),
            ("input_size", input_size),
            ("fc_features", fc_features),
        ):
            check_positive_int(name, value)
        widths = check_positive_ints("widths", widths)
        self.in_channels = in_channels
        self.input_size = input_size
        self.out_features = fc_features

        layers: list[nn.Module] = []
        channels, side = in_channels, input_size
        for _stage, width in enumerate(widths, start=1):
            for _ in range(blocks_per_stage):
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            if side >= 2:  # never pool below 1x1
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                side //= 2
        self.features = nn.Sequential(*layers)
        self.final_side = side
        fc: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * side * side, fc_features, bias=False)]
        if fc_norm_act:
            fc += [nn.BatchNorm1d(fc_features), nn.ReLU(inplace=True)]
        self.fc = nn.Sequential(*fc)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"PlainCNN expects input of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}) "
                f"(set in_channels/input_size to match the data), got {tuple(x.shape)}"
            )
        return self.fc(self.features(x))


@register_backbone("cnn6")
def cnn6(**kwargs) -> PlainCNN:
    """CNN-6: k = 2 convs per stage (MHE Table D.1)."""
    return PlainCNN(blocks_per_stage=2, **kwargs)


@register_backbone("cnn9")
def cnn9(**kwargs) -> PlainCNN:
    """CNN-9: k = 3 convs per stage (MHE Table D.1; the default network of the MHE/CoMHE tables)."""
    return PlainCNN(blocks_per_stage=3, **kwargs)


@register_backbone("cnn15")
def cnn15(**kwargs) -> PlainCNN:
    """CNN-15: k = 5 convs per stage (MHE Table D.1)."""
    return PlainCNN(blocks_per_stage=5, **kwargs)


class CNN1d(nn.Module):
    """1-D CNN for MNIST-1D sequences (B, in_channels, input_length) -> (B, fc_features).

    Same plan as :class:`PlainCNN` in 1-D: stages of [conv(kernel_size)-BN-ReLU] x ``blocks_per_stage``
    with a length-2 max-pool after each stage while the length is at least 2, then a bias-free FC
    layer (BatchNorm1d + ReLU after it only if ``fc_norm_act=True``, as in :class:`PlainCNN`).
    Default widths 32/64/128 on length 40: 40 -> 20 -> 10 -> 5, FC 640 -> 128.
    """

    def __init__(
        self,
        in_channels: int = 1,
        input_length: int = 40,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        kernel_size: int = 5,
        fc_features: int = 128,
        fc_norm_act: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("input_length", input_length),
            ("blocks_per_stage", blocks_per_stage),
            ("kernel_size", kernel_size),
            ("fc_features", fc_features),
        ):
            check_positive_int(name, value)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (length-preserving 'same' padding), got {kernel_size}")
        widths = check_positive_ints("widths", widths)
        self.in_channels = in_channels
        self.input_length = input_length
        self.out_features = fc_features

        layers: list[nn.Module] = []
        channels, length = in_channels, input_length
        for width in widths:
            for _ in range(blocks_per_stage):
                layers += [
                    nn.Conv1d(channels, width, kernel_size, padding=kernel_size // 2, bias=False),
                    nn.BatchNorm1d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            if length >= 2:
                layers.append(nn.MaxPool1d(kernel_size=2, stride=2))
                length //= 2
        self.features = nn.Sequential(*layers)
        self.final_length = length
        fc: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * length, fc_features, bias=False)]
        if fc_norm_act:
            fc += [nn.BatchNorm1d(fc_features), nn.ReLU(inplace=True)]
        self.fc = nn.Sequential(*fc)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.in_channels == 1:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        if x.dim() != 3 or x.shape[1] != self.in_channels or x.shape[-1] != self.input_length:
            raise ValueError(
                f"CNN1d expects input of shape (B, {self.in_channels}, {self.input_length}) "
                f"(set in_channels/input_length to match the data), got {tuple(x.shape)}"
            )
        return self.fc(self.features(x))


@register_backbone("cnn1d")
def cnn1d(**kwargs) -> CNN1d:
    """1-D CNN for MNIST-1D (see :class:`CNN1d`)."""
    return CNN1d(**kwargs)
