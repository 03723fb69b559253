"""SphereFace residual face CNNs, the L-Softmax CNNs of Table 2.1, and a small embedding MLP.

All map an input to an embedding (the FC1 output, **no activation after it**: thesis A.1
"remove the last ReLU", spec sphereface.md §7, §13.6) and expose ``out_features``.

SphereFace-n (thesis Table 2.7; [code] SphereFace-20 prototxt): four stages of widths
64/128/256/512; each stage is one ``3x3, stride 2`` conv + PReLU followed by ``r`` residual units
``x + PReLU(conv3x3(PReLU(conv3x3(x))))`` (identity shortcut, no BN, no post-add activation);
``r`` per stage = (0,0,0,0) / (0,1,2,0) / (1,2,4,1) / (2,4,8,2) / (3,8,16,3) for 4/10/20/36/64
layers (conv count 4 + 2 Σr). Init as the prototxt: strided convs Xavier with bias, convs inside
residual units Gaussian(std 0.01) without bias, FC1 Xavier with zero bias. Default input 112x96
RGB (pixels (v - 127.5)/128), FC1 input 512·7·6. ``input_size``, ``in_channels``,
``width_mult`` and ``embedding_dim`` make tiny CPU versions (e.g. 8x8 digits).

L-Softmax CNNs (thesis Table 2.1): VGG-like, BN + PReLU after every conv, He init, 2x2 max-pools
after Conv1.x-Conv3.x; variants ``mnist_2d``, ``mnist``, ``cifar10``, ``cifar100``, ``lfw``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.models.backbones import register_backbone

__all__ = [
    "EmbeddingMLP",
    "LSoftmaxCNN",
    "SPHEREFACE_UNITS",
    "SphereFaceNet",
    "sphere4",
    "sphere10",
    "sphere20",
    "sphere36",
    "sphere64",
]

#: residual units per stage for each depth (thesis Table 2.7)
SPHEREFACE_UNITS: dict[int, tuple[int, int, int, int]] = {
    4: (0, 0, 0, 0),
    10: (0, 1, 2, 0),
    20: (1, 2, 4, 1),
    36: (2, 4, 8, 2),
    64: (3, 8, 16, 3),
}

EMBEDDING_ACTIVATIONS = (None, "relu", "prelu")


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints, got {size!r}")
    return size  # type: ignore[return-value]


def _scaled(width: int, mult: float) -> int:
    return max(1, int(round(width * mult)))


def _activation(name: str | None, features: int) -> nn.Module | None:
    if name not in EMBEDDING_ACTIVATIONS:
        raise ValueError(f"embedding_activation={name!r} is unknown; accepted values: {list(EMBEDDING_ACTIVATIONS)}")
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(features)
    return None


class _ResidualUnit(nn.Module):
    """``x + PReLU(conv3x3(PReLU(conv3x3(x))))`` (SphereFace, no BN)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.act1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.act2 = nn.PReLU(channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class SphereFaceNet(nn.Module):
    """SphereFace-n residual CNN (thesis Table 2.7): input ``(B, C, H, W)`` -> embedding ``(B, D)``.

    Args:
        depth: 4, 10, 20, 36 or 64 conv layers.
        in_channels: input channels (3 for RGB faces, 1 for digits).
        input_size: ``H`` or ``(H, W)``; default ``(112, 96)`` (SphereFace crops).
        embedding_dim: FC1 size (512 in the thesis).
        width_mult: multiplies the stage widths 64/128/256/512 (CPU-scale models).
        embedding_activation: ``None`` (thesis), ``"relu"`` or ``"prelu"`` after FC1.
    """

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        input_size: int | Sequence[int] = (112, 96),
        embedding_dim: int = 512,
        width_mult: float = 1.0,
        embedding_activation: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in SPHEREFACE_UNITS:
            raise ValueError(f"depth={depth!r} is not a SphereFace depth; accepted values: {sorted(SPHEREFACE_UNITS)}")
        check_positive_int("in_channels", in_channels)
        check_positive_int("embedding_dim", embedding_dim)
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
        self.depth = depth
        self.in_channels = in_channels
        self.input_size = _pair(input_size, "input_size")
        self.out_features = embedding_dim
        layers: list[nn.Module] = []
        channels = in_channels
        h, w = self.input_size
        for width, units in zip((64, 128, 256, 512), SPHEREFACE_UNITS[depth]):
            width = _scaled(width, width_mult)
            conv = nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=True)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.PReLU(width)]
            layers += [_ResidualUnit(width) for _ in range(units)]
            channels = width
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*layers)
        self.final_size = (h, w)
        self.fc = nn.Linear(channels * h * w, embedding_dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.embedding_act = _activation(embedding_activation, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"SphereFaceNet expects input of shape (B, {self.in_channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}) (set in_channels/input_size to match the data), got {tuple(x.shape)}"
            )
        out = self.fc(self.features(x).flatten(1))
        return out if self.embedding_act is None else self.embedding_act(out)


register_backbone("sphereface")(SphereFaceNet)


@register_backbone("sphere4")
def sphere4(**kwargs) -> SphereFaceNet:
    """SphereFace-4 (Table 2.7)."""
    return SphereFaceNet(depth=4, **kwargs)


@register_backbone("sphere10")
def sphere10(**kwargs) -> SphereFaceNet:
    """SphereFace-10 (Table 2.7)."""
    return SphereFaceNet(depth=10, **kwargs)


@register_backbone("sphere20")
def sphere20(**kwargs) -> SphereFaceNet:
    """SphereFace-20 (Table 2.7; the default face model of the thesis and of SphereFace+)."""
    return SphereFaceNet(depth=20, **kwargs)


@register_backbone("sphere36")
def sphere36(**kwargs) -> SphereFaceNet:
    """SphereFace-36 (Table 2.7)."""
    return SphereFaceNet(depth=36, **kwargs)


@register_backbone("sphere64")
def sphere64(**kwargs) -> SphereFaceNet:
    """SphereFace-64 (Table 2.7)."""
    return SphereFaceNet(depth=64, **kwargs)


# (conv0 (width, stride) or None, [(width, kernel, repeats, pool)], embedding, in_channels, input_size)
_LSOFTMAX_VARIANTS: dict[str, dict] = {
    "mnist_2d": dict(conv0=None, stages=[(32, 5, 2, True), (64, 5, 2, True), (128, 5, 2, True)],
                     embedding=2, in_channels=1, input_size=(28, 28)),
    "mnist": dict(conv0=(64, 1), stages=[(64, 3, 3, True), (64, 3, 3, True), (64, 3, 3, True)],
                  embedding=256, in_channels=1, input_size=(28, 28)),
    "cifar10": dict(conv0=(64, 1), stages=[(64, 3, 4, True), (96, 3, 4, True), (128, 3, 4, True)],
                    embedding=256, in_channels=3, input_size=(32, 32)),
    "cifar100": dict(conv0=(96, 1), stages=[(96, 3, 4, True), (192, 3, 4, True), (384, 3, 4, True)],
                     embedding=512, in_channels=3, input_size=(32, 32)),
    "lfw": dict(conv0=(64, 2), stages=[(64, 3, 4, True), (256, 3, 4, True), (256, 3, 4, True), (256, 3, 4, False)],
                embedding=512, in_channels=3, input_size=(112, 96)),
}


@register_backbone("lsoftmax_cnn")
class LSoftmaxCNN(nn.Module):
    """The L-Softmax CNNs of thesis Table 2.1 (BN + PReLU after every conv, He init, no dropout).

    Args:
        variant: ``"mnist_2d"`` (Fig 2.2, 5x5 convs, 2-D embedding), ``"mnist"``, ``"cifar10"``
            (also CIFAR10+), ``"cifar100"`` or ``"lfw"`` (Conv0 stride 2, Conv4.x without pool).
        in_channels, input_size, embedding_dim: default to the variant's values (LFW input size is
            not given in the thesis; 112x96 is used).
        width_mult: multiplies every conv width.
        embedding_activation: ``None`` (thesis A.1), ``"relu"`` or ``"prelu"`` after the FC.

    Max-pools (2x2, stride 2, floor) are skipped once a side is below 2.
    """

    def __init__(
        self,
        variant: str = "mnist",
        in_channels: int | None = None,
        input_size: int | Sequence[int] | None = None,
        embedding_dim: int | None = None,
        width_mult: float = 1.0,
        embedding_activation: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in _LSOFTMAX_VARIANTS:
            raise ValueError(f"variant={variant!r} is unknown; accepted values: {sorted(_LSOFTMAX_VARIANTS)}")
        spec = _LSOFTMAX_VARIANTS[variant]
        self.variant = variant
        self.in_channels = check_positive_int(
            "in_channels", spec["in_channels"] if in_channels is None else in_channels
        )
        self.input_size = _pair(spec["input_size"] if input_size is None else input_size, "input_size")
        self.out_features = check_positive_int(
            "embedding_dim", spec["embedding"] if embedding_dim is None else embedding_dim
        )
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")

        def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                    nn.PReLU(cout)]

        layers: list[nn.Module] = []
        channels = self.in_channels
        h, w = self.input_size
        if spec["conv0"] is not None:
            width, stride = spec["conv0"]
            width = _scaled(width, width_mult)
            layers += block(channels, width, 3, stride)
            channels = width
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        for width, k, repeats, pool in spec["stages"]:
            width = _scaled(width, width_mult)
            for _ in range(repeats):
                layers += block(channels, width, k)
                channels = width
            if pool and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.final_size = (h, w)
        self.fc = nn.Linear(channels * h * w, self.out_features)
        self.embedding_act = _activation(embedding_activation, self.out_features)
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"LSoftmaxCNN({self.variant!r}) expects input of shape (B, {self.in_channels}, "
                f"{self.input_size[0]}, {self.input_size[1]}), got {tuple(x.shape)}"
            )
        out = self.fc(self.features(x).flatten(1))
        return out if self.embedding_act is None else self.embedding_act(out)


@register_backbone("embedding_mlp")
class EmbeddingMLP(nn.Module):
    """Small embedding MLP for CPU experiments (spec §12): ``flatten -> [Linear -> PReLU] x len(hidden) -> Linear``.

    Default ``64 -> 128 -> PReLU -> 128 -> PReLU -> embedding_dim`` (8x8 digits); no activation
    after the embedding.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128),
        embedding_dim: int = 8,
        embedding_activation: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("embedding_dim", embedding_dim)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive_int("hidden", h)
        self.in_features = in_features
        self.out_features = embedding_dim
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.PReLU(h)]
            prev = h
        layers.append(nn.Linear(prev, embedding_dim))
        act = _activation(embedding_activation, embedding_dim)
        if act is not None:
            layers.append(act)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.in_features:
            raise ValueError(
                f"EmbeddingMLP expects inputs with {self.in_features} values per sample, got shape {tuple(x.shape)}"
            )
        return self.net(x)
