"""SphereNet (thesis Ch. 3, Tables B.1/B.2) and DCNet (Ch. 4, Table C.1) backbones, operator chosen by name.

Every backbone takes ``operator`` = ``"conv"`` (plain baseline of identical architecture),
``"sphere"`` (SphereConv / SphereLinear; ``operator_kwargs`` e.g. ``{"angle_fn": "linear"}``),
``"decoupled"`` (DecoupledConv / DecoupledLinear; e.g. ``{"magnitude": "tanh", "angular": "cosine"}``)
or a magnitude name such as ``"tanh"`` / ``"BallConv"`` (= decoupled with that magnitude).
``operator_kwargs={"k_sharing": "per_network", "angle_fn": "learnable"}`` shares one learnable k.

Plain CNN-N (Table B.1 / C.1)::

    stage s = 1..S:  [3x3 op, widths[s]] x blocks_per_stage  (op -> BN -> ReLU), 2x2 max-pool
    FC: op on the flattened map (= op with kernel = remaining map, padding 0) -> BN, no ReLU [ref-code]

Residual networks (Table B.2 / C.1)::

    stem: [3x3 op, widths[0]] (CIFAR) or [7x7 op, widths[0]], stride 2 + 3x3 max-pool (ImageNet)
    stage s: units_per_stage[s] residual units [3x3 op, w; 3x3 op, w] (first unit stride 2 for s > 1)
    unit: op-BN-ReLU-op-BN, + shortcut (identity, or 1x1 plain conv + BN; ``sphere_shortcut`` uses the
    operator there too: SphereResNet "v1"), ReLU; then global average pooling.

``use_bn=False`` removes every BN (SphereNorm-only / DCNet "w/o BN" networks; plain convs then get a
bias), ``relu=False`` removes the ReLUs after the operators (square-cosine DCNets). Weights use He
normal init ``N(0, 2/fan_in)``. Registered names: ``spherenet_cnn``, ``spherenet_resnet``,
``spherenet_resnet18``, ``dcnet_cnn``, ``dcnet_resnet``, ``dcnet_resnet18``.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_hyper.functional.checks import check_positive_int, check_positive_ints
from lightning_hyper.models.backbones import register_backbone
from lightning_hyper.nn.convert import resolve_operator
from lightning_hyper.nn.decoupled import DecoupledConv1d, DecoupledConv2d, DecoupledLinear
from lightning_hyper.nn.sphere import SphereConv1d, SphereConv2d, SphereLinear, make_shared_k

__all__ = [
    "SphereCNN",
    "SphereResNet",
    "dcnet_cnn",
    "dcnet_resnet",
    "dcnet_resnet18",
    "layer_factory",
    "spherenet_cnn",
    "spherenet_resnet",
    "spherenet_resnet18",
]

_CONV = {
    "conv": {1: nn.Conv1d, 2: nn.Conv2d},
    "sphere": {1: SphereConv1d, 2: SphereConv2d},
    "decoupled": {1: DecoupledConv1d, 2: DecoupledConv2d},
}
_LINEAR = {"conv": nn.Linear, "sphere": SphereLinear, "decoupled": DecoupledLinear}


def layer_factory(
    operator: str, operator_kwargs: dict[str, Any] | None = None, dims: int = 2, use_bn: bool = True
) -> tuple[Callable[..., nn.Module], Callable[[int, int], nn.Module], str]:
    """``(conv(in, out, kernel_size, stride=1, padding=0), linear(in, out), family)`` for an operator name.

    Plain convs get a bias only without BN; Sphere/Decoupled layers are bias-free (a BN follows, or the
    thesis' bias-free design). ``k_sharing="per_network"`` creates one shared learnable k.
    """
    kwargs = dict(operator_kwargs or {})
    family = resolve_operator(operator, kwargs, allow_conv=True)
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if family == "sphere" and kwargs.get("k_sharing") == "per_network" and "shared_k" not in kwargs:
        kwargs["shared_k"] = make_shared_k(kwargs.get("k", 0.5), kwargs.get("k_min", 0.05))
    conv_cls, lin_cls = _CONV[family][dims], _LINEAR[family]
    bias = family == "conv" and not use_bn

    def conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Module:
        return conv_cls(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=bias, **kwargs)

    def linear(c_in: int, c_out: int) -> nn.Module:
        return lin_cls(c_in, c_out, bias=bias, **kwargs)

    # build one layer now so that bad operator kwargs fail at construction with the layer's own message
    conv(1, 1, 1)
    return conv, linear, family


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _bn(dims: int, c: int, momentum: float) -> nn.Module:
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c, momentum=momentum)


class SphereCNN(nn.Module):
    """Plain CNN-N of SphereNet (Table B.1) / DCNet (Table C.1) with a chosen operator.

    Args:
        operator, operator_kwargs: see the module docstring.
        depth: number of conv layers (3, 9, 18, 45, 60, 69 ...), divisible by ``len(widths)``; overrides
            ``blocks_per_stage``.
        blocks_per_stage: convs per stage (3 = CNN-9).
        widths: channels per stage (SphereNet 64/96/128; DCNet 64/128/256).
        in_channels, input_size: input shape (side of a square image, or length for ``dims=1``).
        fc_features: width of the FC layer (256 SphereNet, 512 DCNet) = ``out_features``; 0 = no FC layer
            (``out_features`` = flattened map).
        use_bn, relu: BN after every operator (and the FC), ReLU after every conv operator.
        bn_momentum: PyTorch BN momentum (0.1; the reference code's decay 0.999 is ``0.001``, which the
            spec found too slow for short runs).
        dims: 2 (images) or 1 (sequences such as MNIST-1D).

    Input ``(B, in_channels, input_size[, input_size])`` -> features ``(B, out_features)``.
    """

    def __init__(
        self,
        operator: str = "sphere",
        operator_kwargs: dict[str, Any] | None = None,
        depth: int | None = None,
        blocks_per_stage: int = 3,
        widths: Sequence[int] = (64, 96, 128),
        in_channels: int = 3,
        input_size: int = 32,
        fc_features: int = 256,
        use_bn: bool = True,
        relu: bool = True,
        bn_momentum: float = 0.1,
        dims: int = 2,
    ) -> None:
        super().__init__()
        widths = check_positive_ints("widths", widths)
        if depth is not None:
            check_positive_int("depth", depth)
            if depth % len(widths):
                raise ValueError(f"depth={depth} must be a multiple of the number of stages len(widths)={len(widths)}")
            blocks_per_stage = depth // len(widths)
        check_positive_int("blocks_per_stage", blocks_per_stage)
        check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size)
        if isinstance(fc_features, bool) or not isinstance(fc_features, int) or fc_features < 0:
            raise ValueError(f"fc_features must be an integer >= 0, got {fc_features!r}")
        conv, linear, self.operator = layer_factory(operator, operator_kwargs, dims, use_bn)
        self.in_channels, self.input_size, self.dims = in_channels, input_size, dims
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        layers: list[nn.Module] = []
        c, side = in_channels, input_size
        for width in widths:
            for _ in range(blocks_per_stage):
                layers.append(conv(c, width, 3, padding=1))
                if use_bn:
                    layers.append(_bn(dims, width, bn_momentum))
                if relu:
                    layers.append(nn.ReLU(inplace=True))
                c = width
            if side >= 2:
                layers.append(pool(2, 2))
                side //= 2
        self.features = nn.Sequential(*layers)
        flat = c * side**dims
        fc: list[nn.Module] = [nn.Flatten()]
        if fc_features:
            fc.append(linear(flat, fc_features))
            if use_bn:
                fc.append(nn.BatchNorm1d(fc_features, momentum=bn_momentum))
        self.fc = nn.Sequential(*fc)
        self.out_features = fc_features or flat
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *([self.input_size] * self.dims))
        if x.dim() != 2 + self.dims or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {', '.join(map(str, expected))}) "
                f"(set in_channels/input_size/dims to match the data), got {tuple(x.shape)}"
            )
        return self.fc(self.features(x))


class _ResidualUnit(nn.Module):
    def __init__(self, conv: Callable[..., nn.Module], c_in: int, c_out: int, stride: int, use_bn: bool,
                 relu: bool, bn_momentum: float, shortcut_conv: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=bn_momentum) if use_bn else nn.Identity()
        self.conv2 = conv(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum) if use_bn else nn.Identity()
        self.act = nn.ReLU(inplace=False) if relu else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            sc = [shortcut_conv(c_in, c_out, 1, stride=stride)]
            if use_bn:
                sc.append(nn.BatchNorm2d(c_out, momentum=bn_momentum))
            self.shortcut = nn.Sequential(*sc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SphereResNet(nn.Module):
    """SphereResNet / DCNet ResNet (Table B.2 / C.1): stem, residual stages, global average pooling.

    Args:
        operator, operator_kwargs: see the module docstring.
        units_per_stage: residual units per stage (ResNet-32: (5, 5, 5); ResNet-18: (2, 2, 2, 2)).
        widths: channels per stage; the stem has ``widths[0]`` channels.
        in_channels: input channels.
        stem: ``"cifar"`` (3x3 stride 1) or ``"imagenet"`` (7x7 stride 2 + 3x3 max-pool stride 2).
        use_bn, relu, bn_momentum: as in :class:`SphereCNN`.
        sphere_shortcut: use the operator in the 1x1 projection shortcuts too (SphereResNet v1); default
            plain 1x1 conv (v2 / DCNet reference code).

    Input ``(B, in_channels, H, W)`` -> ``(B, widths[-1])``.
    """

    def __init__(
        self,
        operator: str = "sphere",
        operator_kwargs: dict[str, Any] | None = None,
        units_per_stage: Sequence[int] = (5, 5, 5),
        widths: Sequence[int] = (64, 96, 128),
        in_channels: int = 3,
        stem: str = "cifar",
        use_bn: bool = True,
        relu: bool = True,
        bn_momentum: float = 0.1,
        sphere_shortcut: bool = False,
    ) -> None:
        super().__init__()
        widths = check_positive_ints("widths", widths)
        units = tuple(units_per_stage)
        if len(units) != len(widths):
            raise ValueError(f"units_per_stage {units} and widths {widths} must have the same length")
        check_positive_ints("units_per_stage", units)
        check_positive_int("in_channels", in_channels)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem={stem!r} is not supported; accepted values: ['cifar', 'imagenet']")
        conv, _, self.operator = layer_factory(operator, operator_kwargs, 2, use_bn)
        plain_bias = not use_bn

        def plain_conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> nn.Module:
            return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=plain_bias)

        shortcut_conv = conv if sphere_shortcut else plain_conv
        self.in_channels = in_channels
        stem_layers: list[nn.Module] = [
            conv(in_channels, widths[0], 3, padding=1) if stem == "cifar" else conv(in_channels, widths[0], 7, 2, 3)
        ]
        if use_bn:
            stem_layers.append(nn.BatchNorm2d(widths[0], momentum=bn_momentum))
        if relu:
            stem_layers.append(nn.ReLU(inplace=True))
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem_layers)
        stages: list[nn.Module] = []
        c = widths[0]
        for i, (width, n) in enumerate(zip(widths, units)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_ResidualUnit(conv, c, width, stride, use_bn, relu, bn_momentum, shortcut_conv))
                c = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.pool(self.stages(self.stem(x))).flatten(1)


def _with_defaults(defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    out.update(kwargs)
    return out


@register_backbone("spherenet_cnn")
def spherenet_cnn(**kwargs: Any) -> SphereCNN:
    """SphereNet plain CNN-9 (Table B.1): cosine SphereConv, widths 64/96/128, FC-256, BN + ReLU.

    ``depth`` picks CNN-3/9/18/45/60/69; ``operator_kwargs={"angle_fn": ...}`` the angle function.
    """
    return SphereCNN(**_with_defaults({"operator": "sphere", "widths": (64, 96, 128), "fc_features": 256}, kwargs))


@register_backbone("dcnet_cnn")
def dcnet_cnn(**kwargs: Any) -> SphereCNN:
    """DCNet plain CNN-9 (Table C.1): TanhConv + cosine, widths 64/128/256, decoupled FC-512 + BN.

    The adversarial-robustness CNN-9 is ``widths=(32, 64, 128), fc_features=256, use_bn=False``.
    """
    defaults = {
        "operator": "decoupled",  # DecoupledConv defaults: magnitude="tanh", angular="cosine"
        "widths": (64, 128, 256),
        "fc_features": 512,
    }
    return SphereCNN(**_with_defaults(defaults, kwargs))


@register_backbone("spherenet_resnet")
def spherenet_resnet(**kwargs: Any) -> SphereResNet:
    """SphereResNet-32 (Table B.2, §4.2 ablation): stem + 5 units per stage, widths 64/96/128 (96/192/384 for
    the CIFAR-10+/100 network), cosine SphereConv, plain 1x1 shortcuts."""
    return SphereResNet(**_with_defaults({"operator": "sphere", "units_per_stage": (5, 5, 5),
                                          "widths": (64, 96, 128)}, kwargs))


@register_backbone("spherenet_resnet18")
def spherenet_resnet18(**kwargs: Any) -> SphereResNet:
    """Wide SphereResNet-18 of the ImageNet experiment (Table B.2): 7x7/256 stem + max-pool, 2 units per stage,
    widths 256/512/768/1024. ``sphere_shortcut=True`` gives v1, False (default) v2."""
    return SphereResNet(**_with_defaults({"operator": "sphere", "units_per_stage": (2, 2, 2, 2),
                                          "widths": (256, 512, 768, 1024), "stem": "imagenet"}, kwargs))


@register_backbone("dcnet_resnet")
def dcnet_resnet(**kwargs: Any) -> SphereResNet:
    """DCNet ResNet-32 (Table C.1): 3x3/96 stem, 5 units of 96/192/384, TanhConv + cosine, plain 1x1 shortcuts."""
    defaults = {
        "operator": "decoupled",  # DecoupledConv defaults: magnitude="tanh", angular="cosine"
        "units_per_stage": (5, 5, 5),
        "widths": (96, 192, 384),
    }
    return SphereResNet(**_with_defaults(defaults, kwargs))


@register_backbone("dcnet_resnet18")
def dcnet_resnet18(**kwargs: Any) -> SphereResNet:
    """Standard ResNet-18 DCNet (Table C.1, ImageNet): 7x7/64 stem + max-pool, 2 units of 64/128/256/512."""
    defaults = {
        "operator": "decoupled",  # DecoupledConv defaults: magnitude="tanh", angular="cosine"
        "units_per_stage": (2, 2, 2, 2),
        "widths": (64, 128, 256, 512),
        "stem": "imagenet",
    }
    return SphereResNet(**_with_defaults(defaults, kwargs))
