"""PointNet (Qi et al., CVPR'17) with its T-Nets, and a dense PointNet++ (SSG, Qi et al., NeurIPS'17).

Both take a batch of point clouds ``(B, N, C)`` (channels last; ``C = 3`` for xyz) and return global
features ``(B, out_features)``; the classifier lives in the LightningModule. Shared per-point MLPs are
1×1 convolutions (``Conv1d`` / ``Conv2d``), FC layers are ``Linear``; every one of them is a neuron layer,
so OPT (thesis §7.4.6: all 1×1 convs and FCs except the classifier) and the energy callbacks apply.
The T-Nets' last layers (``transform_head``) start at zero weight with an identity bias, so they are
not OPT-able (``W = R·0``) and are excluded by ``PointCloudClassifier``.

PointNet (``pointnet``): [input T-Net 3×3] → shared MLP ``widths[:2]`` → [feature T-Net] → shared MLP
``widths[2:]`` → max-pool → FC ``fc_widths`` (BN, ReLU, dropout). Defaults 64-64-64-128-1024 and
512-256 (the thesis' vanilla PointNet is ``input_transform=False, feature_transform=False``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_hyper.functional.checks import check_positive_ints
from lightning_hyper.models.backbones import register_backbone

__all__ = ["PointNet", "PointNet2", "TNet", "farthest_point_sample", "ball_query"]


def _shared_mlp(sizes: Sequence[int], dim: int = 1) -> nn.Sequential:
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [conv(a, b, 1, bias=False), bn(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _fc(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class TNet(nn.Module):
    """Predicts a ``k × k`` alignment matrix from ``(B, k, N)`` per-point features (initialized to ``I``)."""

    def __init__(self, k: int, widths: Sequence[int] = (64, 128, 1024), fc_widths: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        widths, fc_widths = check_positive_ints("widths", widths), check_positive_ints("fc_widths", fc_widths)
        self.k = k
        self.mlp = _shared_mlp((k, *widths))
        self.fc = _fc((widths[-1], *fc_widths), dropout=0.0)
        self.transform_head = nn.Linear(fc_widths[-1], k * k)
        nn.init.zeros_(self.transform_head.weight)
        with torch.no_grad():
            self.transform_head.bias.copy_(torch.eye(k).flatten())

    def forward(self, x: Tensor) -> Tensor:
        g = self.mlp(x).amax(dim=2)
        return self.transform_head(self.fc(g)).view(-1, self.k, self.k)


class PointNet(nn.Module):
    """PointNet global-feature extractor ``(B, N, in_channels) -> (B, fc_widths[-1])``.

    Args:
        in_channels: per-point input size (3 for xyz).
        widths: shared-MLP widths (the feature T-Net acts after the second one).
        fc_widths: FC widths after the max-pool (``out_features = fc_widths[-1]``).
        input_transform, feature_transform: use the input (k = in_channels) / feature (k = widths[1]) T-Nets.
        dropout: dropout after each FC block (0.3, i.e. keep probability 0.7).
        tnet_widths, tnet_fc_widths: sizes of the T-Nets.

    After a forward pass ``self.feature_transform_matrix`` holds the feature T-Net's output
    (``None`` without it); :meth:`feature_transform_loss` is PointNet's ``‖I − AAᵀ‖_F²`` (batch mean).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 64, 64, 128, 1024),
                 fc_widths: Sequence[int] = (512, 256), input_transform: bool = True,
                 feature_transform: bool = True, dropout: float = 0.3,
                 tnet_widths: Sequence[int] = (64, 128, 1024), tnet_fc_widths: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        widths, fc_widths = check_positive_ints("widths", widths), check_positive_ints("fc_widths", fc_widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 entries, got {widths!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.input_tnet = TNet(in_channels, tnet_widths, tnet_fc_widths) if input_transform else None
        self.mlp1 = _shared_mlp((in_channels, *widths[:2]))
        self.feature_tnet = TNet(widths[1], tnet_widths, tnet_fc_widths) if feature_transform else None
        self.mlp2 = _shared_mlp(widths[1:])
        self.fc = _fc((widths[-1], *fc_widths), dropout)
        self.out_features = fc_widths[-1]
        self.feature_transform_matrix: Tensor | None = None

    def forward(self, points: Tensor) -> Tensor:
        if points.dim() != 3 or points.shape[-1] != self.in_channels:
            raise ValueError(f"PointNet expects point clouds of shape (B, N, {self.in_channels}), got "
                             f"{tuple(points.shape)}")
        x = points.transpose(1, 2)  # (B, C, N)
        if self.input_tnet is not None:
            x = torch.bmm(self.input_tnet(x), x)
        x = self.mlp1(x)
        if self.feature_tnet is not None:
            A = self.feature_tnet(x)
            self.feature_transform_matrix = A
            x = torch.bmm(A, x)
        x = self.mlp2(x).amax(dim=2)
        return self.fc(x)

    def feature_transform_loss(self) -> Tensor:
        """``mean_b ‖I − A_b A_bᵀ‖_F²`` of the last forward's feature transform (0 without it)."""
        A = self.feature_transform_matrix
        if A is None:
            p = next(self.parameters())
            return p.new_zeros(())
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return ((eye - A @ A.mT) ** 2).sum(dim=(1, 2)).mean()


# ---------------------------------------------------------------------- PointNet++ (dense, SSG)
def farthest_point_sample(xyz: Tensor, npoint: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``(B, npoint)`` of iterative farthest-point sampling from ``xyz`` ``(B, N, 3)``.

    The first point is random in training (``generator``) — here always index 0 for determinism
    unless a generator is given."""
    B, N, _ = xyz.shape
    npoint = min(npoint, N)
    idx = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((B, N), float("inf"), device=xyz.device, dtype=xyz.dtype)
    far = (torch.randint(N, (B,), generator=generator).to(xyz.device) if generator is not None
           else torch.zeros(B, dtype=torch.long, device=xyz.device))
    batch = torch.arange(B, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = far
        centroid = xyz[batch, far].unsqueeze(1)
        dist = torch.minimum(dist, ((xyz - centroid) ** 2).sum(-1))
        far = dist.argmax(-1)
    return idx


def ball_query(xyz: Tensor, centers: Tensor, radius: float, nsample: int) -> Tensor:
    """Indices ``(B, S, nsample)`` of up to ``nsample`` points within ``radius`` of each center
    (the first ones in index order; missing slots repeat the first hit, which is the center itself)."""
    B, N, _ = xyz.shape
    d2 = torch.cdist(centers, xyz) ** 2  # (B, S, N)
    order = torch.arange(N, device=xyz.device).expand_as(d2)
    keyed = torch.where(d2 <= radius**2, order, torch.full_like(order, N))
    idx = keyed.sort(dim=-1).values[..., :nsample]
    first = idx[..., :1].expand_as(idx)
    idx = torch.where(idx == N, first, idx)
    return idx.clamp_max(N - 1)


def _gather(points: Tensor, idx: Tensor) -> Tensor:
    """``points`` (B, N, C) gathered at ``idx`` (B, ...) -> (B, ..., C)."""
    B = points.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*idx.shape, points.shape[-1])


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction: FPS centers, ball grouping, shared MLP (1×1 Conv2d), max-pool.

    ``npoint=None`` groups all points into one (the global layer)."""

    def __init__(
        self, npoint: int | None, radius: float, nsample: int, in_channels: int, widths: Sequence[int]
    ) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample
        self.mlp = _shared_mlp((in_channels + 3, *widths), dim=2)
        self.out_channels = widths[-1]

    def forward(self, xyz: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.npoint is None:
            grouped = xyz.unsqueeze(1)  # (B, 1, N, 3)
            new_xyz = xyz.new_zeros(xyz.shape[0], 1, 3)
            if features is not None:
                grouped = torch.cat([grouped, features.unsqueeze(1)], dim=-1)
        else:
            new_xyz = _gather(xyz, farthest_point_sample(xyz, self.npoint))
            idx = ball_query(xyz, new_xyz, self.radius, self.nsample)
            grouped = _gather(xyz, idx) - new_xyz.unsqueeze(2)  # (B, S, K, 3) relative coordinates
            if features is not None:
                grouped = torch.cat([grouped, _gather(features, idx)], dim=-1)
        out = self.mlp(grouped.permute(0, 3, 1, 2)).amax(dim=-1)  # (B, C', S)
        return new_xyz, out.transpose(1, 2)


class PointNet2(nn.Module):
    """PointNet++ single-scale grouping, dense PyTorch (no compiled extensions).

    Args:
        in_channels: 3 (xyz only) or more (xyz + per-point features in the remaining channels).
        npoints, radii, nsamples, widths: the two local set-abstraction levels (default 512/128 centers,
            radius 0.2/0.4, 32/64 neighbors, MLPs 64-64-128 / 128-128-256), then a global level ``widths[2]``.
        fc_widths, dropout: FC head (512-256, dropout 0.5 in the reference code).
    """

    def __init__(self, in_channels: int = 3, npoints: Sequence[int] = (512, 128), radii: Sequence[float] = (0.2, 0.4),
                 nsamples: Sequence[int] = (32, 64),
                 widths: Sequence[Sequence[int]] = ((64, 64, 128), (128, 128, 256), (256, 512, 1024)),
                 fc_widths: Sequence[int] = (512, 256), dropout: float = 0.5) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3 (xyz first), got {in_channels}")
        if not (len(npoints) == len(radii) == len(nsamples) == len(widths) - 1):
            raise ValueError("npoints, radii, nsamples need one entry per local level and widths one more (global)")
        self.in_channels = in_channels
        levels, c = [], in_channels - 3
        for npoint, r, k, w in zip(npoints, radii, nsamples, widths[:-1]):
            levels.append(SetAbstraction(npoint, r, k, c, check_positive_ints("widths", w)))
            c = levels[-1].out_channels
        levels.append(SetAbstraction(None, 0.0, 0, c, check_positive_ints("widths", widths[-1])))
        self.levels = nn.ModuleList(levels)
        self.fc = _fc((levels[-1].out_channels, *check_positive_ints("fc_widths", fc_widths)), dropout)
        self.out_features = fc_widths[-1]

    def forward(self, points: Tensor) -> Tensor:
        if points.dim() != 3 or points.shape[-1] != self.in_channels:
            raise ValueError(f"PointNet2 expects point clouds of shape (B, N, {self.in_channels}), got "
                             f"{tuple(points.shape)}")
        xyz = points[..., :3].contiguous()
        feats = points[..., 3:] if self.in_channels > 3 else None
        for level in self.levels:
            xyz, feats = level(xyz, feats)
        return self.fc(feats.squeeze(1))


@register_backbone("pointnet")
def pointnet(**kwargs) -> PointNet:
    """PointNet with T-Nets (``input_transform=False, feature_transform=False``: the thesis' vanilla one)."""
    return PointNet(**kwargs)


@register_backbone("pointnet2")
def pointnet2(**kwargs) -> PointNet2:
    """PointNet++ (single-scale grouping)."""
    return PointNet2(**kwargs)
