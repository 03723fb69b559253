"""Point-cloud DataModules: seeded synthetic primitive shapes (offline) and ModelNet10/40 (user data).

Batches are ``(points, labels)`` with ``points`` of shape ``(B, N, 3)`` (float32, channels last) and
``labels`` int64, the layout of :class:`~lightning_hyper.models.backbones.pointnet.PointNet`.

:class:`SyntheticShapesDataModule` samples ``N`` points uniformly (by area) on the surface of a
primitive — sphere, cube, cylinder, cone, torus, pyramid, octahedron, disk — then centers it, scales
it into the unit ball, applies a uniformly random rotation (``rotate=True``) and adds Gaussian noise
(``noise``). The train/val/test sets are drawn from independent seeded generators, so the data are a
pure function of the arguments.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hyper.data.sampling import epoch_loader

__all__ = ["SHAPES", "ModelNetDataModule", "SyntheticShapesDataModule", "random_rotation", "sample_shape"]


def _sample_triangles(vertices: Tensor, faces: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``n`` points uniform (by area) on a triangle mesh."""
    tri = vertices[faces]  # (F, 3, 3)
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1)
    choice = torch.multinomial(area, n, replacement=True, generator=gen)
    u, v = torch.rand(n, 1, generator=gen), torch.rand(n, 1, generator=gen)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    t = tri[choice]
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def _sphere(n: int, gen: torch.Generator) -> Tensor:
    x = torch.randn(n, 3, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def _cube(n: int, gen: torch.Generator) -> Tensor:
    face = torch.randint(6, (n,), generator=gen)
    pts = torch.rand(n, 3, generator=gen) * 2 - 1
    axis, sign = face // 2, (face % 2).float() * 2 - 1
    pts[torch.arange(n), axis] = sign
    return pts


def _disk_points(n: int, radius: float, gen: torch.Generator) -> Tensor:
    r = radius * torch.rand(n, generator=gen).sqrt()
    phi = 2 * math.pi * torch.rand(n, generator=gen)
    return torch.stack([r * phi.cos(), r * phi.sin()], dim=1)


def _cylinder(n: int, gen: torch.Generator, radius: float = 0.6, height: float = 2.0) -> Tensor:
    side, cap = 2 * math.pi * radius * height, math.pi * radius**2
    on_side = torch.rand(n, generator=gen) < side / (side + 2 * cap)
    phi = 2 * math.pi * torch.rand(n, generator=gen)
    z = (torch.rand(n, generator=gen) - 0.5) * height
    side_pts = torch.stack([radius * phi.cos(), radius * phi.sin(), z], dim=1)
    disk = _disk_points(n, radius, gen)
    top = torch.where(torch.rand(n, generator=gen) < 0.5, height / 2, -height / 2)
    cap_pts = torch.cat([disk, top.unsqueeze(1)], dim=1)
    return torch.where(on_side.unsqueeze(1), side_pts, cap_pts)


def _cone(n: int, gen: torch.Generator, radius: float = 1.0, height: float = 1.5) -> Tensor:
    slant = math.hypot(radius, height)
    lateral, base = math.pi * radius * slant, math.pi * radius**2
    on_side = torch.rand(n, generator=gen) < lateral / (lateral + base)
    t = torch.rand(n, generator=gen).sqrt()  # distance fraction from the apex, density ∝ t
    phi = 2 * math.pi * torch.rand(n, generator=gen)
    side_pts = torch.stack([t * radius * phi.cos(), t * radius * phi.sin(), height / 2 - t * height], dim=1)
    base_pts = torch.cat([_disk_points(n, radius, gen), torch.full((n, 1), -height / 2)], dim=1)
    return torch.where(on_side.unsqueeze(1), side_pts, base_pts)


def _torus(n: int, gen: torch.Generator, major: float = 1.0, minor: float = 0.35) -> Tensor:
    out: list[Tensor] = []
    count = 0
    while count < n:  # rejection sampling: surface density ∝ (R + r cos ψ)
        m = 2 * (n - count) + 16
        theta = 2 * math.pi * torch.rand(m, generator=gen)
        psi = 2 * math.pi * torch.rand(m, generator=gen)
        keep = torch.rand(m, generator=gen) < (major + minor * psi.cos()) / (major + minor)
        theta, psi = theta[keep], psi[keep]
        ring = major + minor * psi.cos()
        out.append(torch.stack([ring * theta.cos(), ring * theta.sin(), minor * psi.sin()], dim=1))
        count += int(keep.sum())
    return torch.cat(out)[:n]


def _pyramid(n: int, gen: torch.Generator) -> Tensor:
    v = torch.tensor([[-1.0, -1, -0.7], [1, -1, -0.7], [1, 1, -0.7], [-1, 1, -0.7], [0, 0, 1.0]])
    f = torch.tensor([[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4], [0, 1, 2], [0, 2, 3]])
    return _sample_triangles(v, f, n, gen)


def _octahedron(n: int, gen: torch.Generator) -> Tensor:
    v = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    f = torch.tensor([[a, b, c] for a in (0, 1) for b in (2, 3) for c in (4, 5)])
    return _sample_triangles(v, f, n, gen)


def _disk(n: int, gen: torch.Generator) -> Tensor:
    return torch.cat([_disk_points(n, 1.0, gen), torch.zeros(n, 1)], dim=1)


SHAPES: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "pyramid": _pyramid,
    "octahedron": _octahedron,
    "disk": _disk,
}
DEFAULT_SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")


def random_rotation(gen: torch.Generator) -> Tensor:
    """A Haar-uniform rotation in SO(3): ``Q₊`` of a Gaussian matrix with its determinant fixed to +1."""
    Q, R = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    Q = Q * torch.where(R.diagonal() >= 0, 1.0, -1.0)
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q.float()


def sample_shape(shape: str, num_points: int, gen: torch.Generator, noise: float = 0.0, rotate: bool = True) -> Tensor:
    """One point cloud ``(num_points, 3)`` of a primitive: sampled, centered, scaled into the unit ball,
    rotated and jittered with N(0, noise²)."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; accepted values: {sorted(SHAPES)}")
    pts = SHAPES[shape](num_points, gen)
    pts = pts - pts.mean(dim=0, keepdim=True)
    pts = pts / pts.norm(dim=1).max()
    if rotate:
        pts = pts @ random_rotation(gen).mT
    if noise > 0:
        pts = pts + noise * torch.randn(pts.shape, generator=gen)
    return pts


class _SplitsDataModule(L.LightningDataModule):
    """Train / val / test loaders over ``self.splits`` (built in ``setup``), shuffled per epoch by seed."""

    splits: list | None
    batch_size: int
    num_workers: int

    def _loader(self, i: int, shuffle: bool) -> DataLoader:
        self.setup()
        return epoch_loader(self.splits[i], batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(2, False)


class SyntheticShapesDataModule(_SplitsDataModule):
    """Primitive-shape point clouds (one class per shape), seeded and offline.

    Args:
        shapes: shape names (default sphere, cube, cylinder, cone, torus, pyramid; also octahedron, disk).
        num_points: points per cloud.
        train_per_class, val_per_class, test_per_class: clouds per class in each split.
        noise: std of the Gaussian jitter.
        rotate: apply a uniformly random 3-D rotation to every cloud.
        batch_size, num_workers: loader settings.
        seed: seeds the three splits (independent generators ``seed``, ``seed + 1``, ``seed + 2``: the data a seed
            gives is kept fixed across versions, so published results stay reproducible).

    Attributes: ``num_classes``, ``in_channels = 3``, ``class_names``.
    """

    in_channels = 3

    def __init__(self, shapes: Sequence[str] | None = None, num_points: int = 256, train_per_class: int = 64,
                 val_per_class: int = 16, test_per_class: int = 16, noise: float = 0.02, rotate: bool = True,
                 batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        shapes = list(DEFAULT_SHAPES if shapes is None else shapes)
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or len(shapes) < 2 or len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes must be >= 2 distinct names from {sorted(SHAPES)}, got {shapes!r}")
        for name, value in (("num_points", num_points), ("train_per_class", train_per_class),
                            ("val_per_class", val_per_class), ("test_per_class", test_per_class),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.save_hyperparameters()
        self.class_names = shapes
        self.num_classes = len(shapes)
        self.num_points, self.noise, self.rotate = num_points, float(noise), rotate
        self.sizes = (train_per_class, val_per_class, test_per_class)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.splits: list[TensorDataset] | None = None

    def make_split(self, per_class: int, seed: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(seed)
        clouds, labels = [], []
        for label, shape in enumerate(self.class_names):
            for _ in range(per_class):
                clouds.append(sample_shape(shape, self.num_points, gen, self.noise, self.rotate))
                labels.append(label)
        return TensorDataset(torch.stack(clouds), torch.tensor(labels, dtype=torch.long))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = [self.make_split(n, self.seed + i) for i, n in enumerate(self.sizes)]


class _SampledMeshes(Dataset):
    """torch-geometric mesh dataset -> ``(points (N, 3), label)`` with points resampled on every access."""

    def __init__(self, dataset, num_points: int) -> None:
        from torch_geometric.transforms import SamplePoints

        self.dataset, self.sample = dataset, SamplePoints(num_points)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        data = self.dataset[i]
        if getattr(data, "face", None) is not None:
            data = self.sample(data.clone())
        return data.pos.float(), data.y.view(()).long()


class ModelNetDataModule(_SplitsDataModule):
    """ModelNet10 / ModelNet40 via torch-geometric, for users who have the data.

    Args:
        root: folder whose ``raw/`` holds one directory per category with ``train/`` and ``test/``
            ``.off`` meshes (the unzipped ``ModelNet40``); processed tensors are cached in ``processed/``.
        name: ``"10"`` or ``"40"``.
        num_points: points sampled uniformly on each mesh (re-sampled every time a shape is read).
        val_fraction: share of the training meshes held out for validation (seeded).
        download: allow torch-geometric to download (off by default).
        batch_size, num_workers, seed: loader settings.

    Meshes are centered and scaled into ``[-1, 1]`` (``NormalizeScale``) once, at processing time.
    """

    in_channels = 3

    def __init__(self, root: str, name: str = "40", num_points: int = 1024, val_fraction: float = 0.1,
                 batch_size: int = 32, download: bool = False, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if str(name) not in ("10", "40"):
            raise ValueError(f"name={name!r} is not supported; accepted values: ['10', '40']")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.root, self.name, self.num_points = str(root), str(name), num_points
        self.val_fraction, self.batch_size, self.download = val_fraction, batch_size, download
        self.num_workers, self.seed = num_workers, seed
        self.splits: list[Dataset] | None = None
        self.num_classes: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from torch.utils.data import Subset
        from torch_geometric.datasets import ModelNet
        from torch_geometric.transforms import NormalizeScale

        raw = os.path.join(self.root, "raw")
        processed = os.path.join(self.root, "processed")
        if not self.download and not os.path.isdir(processed):
            required = ModelNet.raw_file_names.fget(None)  # type: ignore[attr-defined]
            missing = [c for c in required if not os.path.isdir(os.path.join(raw, c))]
            if missing:
                raise FileNotFoundError(
                    f"ModelNetDataModule: category folders missing under {raw!r}: {missing}. Unzip ModelNet"
                    f"{self.name} there (raw/<category>/{{train,test}}/*.off) or pass download=True."
                )
        train = ModelNet(self.root, self.name, train=True, pre_transform=NormalizeScale())
        test = ModelNet(self.root, self.name, train=False, pre_transform=NormalizeScale())
        self.num_classes = int(max(int(train.y.max()), int(test.y.max()))) + 1
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(train), generator=gen).tolist()
        n_val = int(round(self.val_fraction * len(train)))
        full = _SampledMeshes(train, self.num_points)
        self.splits = [Subset(full, perm[n_val:]), Subset(full, perm[:n_val]), _SampledMeshes(test, self.num_points)]
