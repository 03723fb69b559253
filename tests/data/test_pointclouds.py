"""Synthetic primitive shapes (surface equations, area-uniform sampling, seeding) and ModelNet on tiny OFF files."""
import math

import pytest
import torch

from lightning_hyper.data.pointclouds import (
    SHAPES,
    ModelNetDataModule,
    SyntheticShapesDataModule,
    random_rotation,
    sample_shape,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_samplers_lie_on_their_surfaces():
    n = 2000
    p = SHAPES["sphere"](n, _gen())
    assert torch.allclose(p.norm(dim=1), torch.ones(n), atol=1e-6)
    p = SHAPES["cube"](n, _gen())
    assert torch.allclose(p.abs().amax(dim=1), torch.ones(n))
    faces = torch.stack([(p[:, a] == s).sum() for a in range(3) for s in (-1.0, 1.0)]).float() / n
    assert (faces - 1 / 6).abs().max() < 0.03  # equal-area faces equally likely
    p = SHAPES["cylinder"](n, _gen())  # radius 0.6, height 2
    r = p[:, :2].norm(dim=1)
    side = (r - 0.6).abs() < 1e-5
    assert (side | ((p[:, 2].abs() - 1).abs() < 1e-6)).all()
    expected_side = 2 * math.pi * 0.6 * 2 / (2 * math.pi * 0.6 * 2 + 2 * math.pi * 0.36)
    assert abs(side.float().mean().item() - expected_side) < 0.03
    p = SHAPES["cone"](n, _gen())  # radius 1, height 1.5, apex at z = 0.75
    r, z = p[:, :2].norm(dim=1), p[:, 2]
    lateral = (r - (0.75 - z) / 1.5).abs() < 1e-5
    assert (lateral | ((z + 0.75).abs() < 1e-6)).all()
    p = SHAPES["torus"](n, _gen())  # R = 1, r = 0.35
    assert torch.allclose((p[:, :2].norm(dim=1) - 1) ** 2 + p[:, 2] ** 2, torch.full((n,), 0.35**2), atol=1e-5)
    # area-uniform: density ∝ distance to the axis, so the outer half holds more than half the points
    assert ((p[:, :2].norm(dim=1) > 1).float().mean() - (0.5 + 0.35 / (2 * math.pi) * 2)).abs() < 0.04
    p = SHAPES["octahedron"](n, _gen())
    assert torch.allclose(p.abs().sum(dim=1), torch.ones(n), atol=1e-5)
    p = SHAPES["disk"](n, _gen())
    assert (p[:, 2] == 0).all() and (p[:, :2].norm(dim=1) <= 1 + 1e-6).all()
    p = SHAPES["pyramid"](n, _gen())
    assert (p[:, 2] >= -0.7 - 1e-6).all() and (p[:, 2] <= 1 + 1e-6).all()


def test_sample_shape_normalizes_rotates_and_is_seeded():
    R = random_rotation(_gen(1))
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6) and torch.linalg.det(R) > 0
    a = sample_shape("torus", 500, _gen(2), noise=0.0, rotate=True)
    assert a.mean(0).abs().max() < 1e-5 and a.norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    b = sample_shape("torus", 500, _gen(2), noise=0.0, rotate=True)
    assert torch.equal(a, b)
    c = sample_shape("torus", 500, _gen(2), noise=0.0, rotate=False)
    # same points up to the rotation: the pairwise-distance matrix is unchanged
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.allclose(torch.cdist(a, a, compute_mode=exact), torch.cdist(c, c, compute_mode=exact), atol=1e-5)
    noisy = sample_shape("sphere", 2000, _gen(3), noise=0.05, rotate=False)
    assert abs((noisy.norm(dim=1) - 1).std().item() - 0.05) < 0.01
    with pytest.raises(ValueError, match="accepted values"):
        sample_shape("teapot", 10, _gen())


def test_synthetic_shapes_datamodule():
    dm = SyntheticShapesDataModule(shapes=["sphere", "cube", "torus"], num_points=32, train_per_class=4,
                                   val_per_class=2, test_per_class=3, batch_size=5, seed=0)
    dm.setup()
    assert dm.num_classes == 3 and [len(s) for s in dm.splits] == [12, 6, 9]
    assert torch.bincount(dm.splits[0].tensors[1]).tolist() == [4, 4, 4]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 32, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = SyntheticShapesDataModule(shapes=["sphere", "cube", "torus"], num_points=32, train_per_class=4,
                                      val_per_class=2, test_per_class=3, seed=0)
    again.setup()
    assert torch.equal(again.splits[2].tensors[0], dm.splits[2].tensors[0])
    assert not torch.equal(dm.splits[0].tensors[0][:2], dm.splits[1].tensors[0][:2])  # independent splits
    with pytest.raises(ValueError, match="distinct names"):
        SyntheticShapesDataModule(shapes=["sphere", "blob"])


_TETRA = "OFF\n4 4 0\n0 0 0\n{s} 0 0\n0 {s} 0\n0 0 {s}\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
MODELNET10 = ["bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa", "table", "toilet"]


def test_modelnet_reads_tiny_off_files(tmp_path):
    root = tmp_path / "ModelNet"
    categories = MODELNET10 + ["airplane", "xbox"]
    for c, cat in enumerate(categories):
        for split, count in (("train", 3), ("test", 1)):
            folder = root / "raw" / cat / split
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{cat}_{i + 1:04d}.off").write_text(_TETRA.format(s=1 + 0.1 * c + 0.01 * i))
    dm = ModelNetDataModule(str(root), name="40", num_points=16, val_fraction=0.25, batch_size=4)
    dm.setup()
    assert dm.num_classes == 12
    assert [len(s) for s in dm.splits] == [27, 9, 12]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 16, 3) and y.tolist() == [0, 1, 2, 3]  # categories sorted: airplane, bathtub, ...
    # points lie on the (normalized) tetrahedron: inside the unit cube, on one of its faces
    assert x.abs().max() <= 1 + 1e-5
    with pytest.raises(FileNotFoundError, match="download=True"):
        ModelNetDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(ValueError, match="accepted values"):
        ModelNetDataModule(str(root), name="20")
