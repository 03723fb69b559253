"""Hierarchy-aware DataModules: the CIFAR-100 coarse map on a fake torchvision tree, and the offline
Gaussian hierarchy. The fake CIFAR-100 files follow torchvision's pickle format (train, test, meta);
their MD5 sums cannot match, so torchvision's integrity check is reduced to an existence check."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets.utils import check_integrity

from lightning_hyper.data import (
    CIFAR100HierarchyDataModule,
    DigitsDataModule,
    HierarchicalDigitsDataModule,
    HierarchicalGaussianDataModule,
)
from lightning_hyper.data.hierarchy import (
    DIGITS_COARSE_LABELS,
    DIGITS_SUPERCLASSES,
    CIFAR100_COARSE_LABEL_NAMES,
    CIFAR100_COARSE_LABELS,
    CIFAR100_FINE_LABEL_NAMES,
    CIFAR100_SUPERCLASSES,
)
from lightning_hyper.nn import HierarchicalLinear, Hierarchy

# the fine -> coarse map as commonly quoted (e.g. torchvision users' "sparse2coarse"), written independently
REFERENCE_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]


def test_cifar100_coarse_map_constant():
    assert list(CIFAR100_COARSE_LABELS) == REFERENCE_COARSE
    assert len(CIFAR100_FINE_LABEL_NAMES) == 100 and len(set(CIFAR100_FINE_LABEL_NAMES)) == 100
    assert len(CIFAR100_COARSE_LABEL_NAMES) == 20
    assert all(len(v) == 5 for v in CIFAR100_SUPERCLASSES.values())
    assert np.bincount(CIFAR100_COARSE_LABELS).tolist() == [5] * 20
    fine = CIFAR100_FINE_LABEL_NAMES
    assert CIFAR100_COARSE_LABEL_NAMES[CIFAR100_COARSE_LABELS[fine.index("whale")]] == "aquatic_mammals"
    assert CIFAR100_COARSE_LABEL_NAMES[CIFAR100_COARSE_LABELS[fine.index("tractor")]] == "vehicles_2"
    assert Hierarchy.parse("cifar100") == Hierarchy.parse(REFERENCE_COARSE)
    assert HierarchicalLinear(8, 100, hierarchy="cifar100").hierarchy.sizes == (20, 100)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar100(root: Path, seed: int = 0, coarse_error: bool = False, names=None) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for split, n in (("train", 12), ("test", 6)):
        x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 100, n)
        coarse = [REFERENCE_COARSE[int(v)] for v in y]
        if coarse_error and split == "test":
            coarse[2] = (coarse[2] + 1) % 20
        _dump(base / split, {"data": x, "fine_labels": y.tolist(), "coarse_labels": coarse})
        out[split] = y
    _dump(base / "meta", {"fine_label_names": list(names or CIFAR100_FINE_LABEL_NAMES),
                          "coarse_label_names": list(CIFAR100_COARSE_LABEL_NAMES)})
    return out


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: check_integrity(fpath, None))


def test_cifar100_batches_carry_fine_and_coarse_labels(tmp_path, no_md5):
    labels = write_fake_cifar100(tmp_path)
    dm = CIFAR100HierarchyDataModule(root=str(tmp_path), batch_size=5, augment=False)
    dm.setup("fit")
    assert dm.hierarchy == REFERENCE_COARSE and dm.num_classes == 100 and dm.num_super_classes == 20
    x, y, yc = next(iter(dm.val_dataloader()))  # validation = the test split, in order
    assert x.shape == (5, 3, 32, 32)
    assert y.tolist() == labels["test"][:5].tolist()
    assert yc.tolist() == [REFERENCE_COARSE[v] for v in y.tolist()]
    _, y, yc = next(iter(dm.train_dataloader()))
    assert yc.tolist() == [REFERENCE_COARSE[v] for v in y.tolist()]
    plain = CIFAR100HierarchyDataModule(root=str(tmp_path), batch_size=5, return_coarse=False)
    plain.setup("test")
    assert len(next(iter(plain.test_dataloader()))) == 2


def test_cifar100_coarse_labels_are_verified(tmp_path, no_md5):
    write_fake_cifar100(tmp_path / "a", coarse_error=True)
    with pytest.raises(ValueError, match=r"test: sample 2 has fine label \d+ and coarse label \d+, but CIFAR-100 maps"):
        CIFAR100HierarchyDataModule(root=str(tmp_path / "a")).setup("test")
    CIFAR100HierarchyDataModule(root=str(tmp_path / "a"), verify_coarse=False).setup("test")
    write_fake_cifar100(tmp_path / "b", names=[f"f{i}" for i in range(100)])
    with pytest.raises(ValueError, match="fine_label_names differ from CIFAR-100's"):
        CIFAR100HierarchyDataModule(root=str(tmp_path / "b")).setup("test")


def test_cifar100_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100HierarchyDataModule(root=str(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------- offline Gaussian hierarchy
def test_gaussian_hierarchy_batches_and_determinism():
    dm = HierarchicalGaussianDataModule(num_super=3, classes_per_super=2, dim=5, train_per_class=4,
                                        val_per_class=3, batch_size=8, seed=1)
    assert dm.hierarchy == [0, 0, 1, 1, 2, 2] and dm.num_classes == 6 and dm.in_features == 5
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.val_set) == 18
    x, y, yc = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 5) and x.dtype == torch.float32
    assert yc.tolist() == [v // 2 for v in y.tolist()]
    again = HierarchicalGaussianDataModule(num_super=3, classes_per_super=2, dim=5, train_per_class=4,
                                           val_per_class=3, batch_size=8, seed=1)
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    assert torch.equal(next(iter(again.train_dataloader()))[0], x)  # same shuffling
    other = HierarchicalGaussianDataModule(num_super=3, classes_per_super=2, dim=5, seed=2)
    assert not torch.equal(other.generate()["class_means"], dm.generate()["class_means"])
    flat = HierarchicalGaussianDataModule(num_super=3, classes_per_super=2, dim=5, return_coarse=False)
    flat.setup()
    assert len(next(iter(flat.val_dataloader()))) == 2


def test_gaussian_hierarchy_is_genuine():
    """Classes of one super-class are closer to each other than to the other super-classes' classes."""
    dm = HierarchicalGaussianDataModule(num_super=5, classes_per_super=4, dim=32, seed=0)
    d = dm.generate()
    means, parents = d["class_means"], torch.tensor(dm.hierarchy)
    dist = torch.cdist(means, means)
    same = (parents[:, None] == parents[None, :]) & ~torch.eye(20, dtype=torch.bool)
    diff = parents[:, None] != parents[None, :]
    assert dist[same].mean() < 0.6 * dist[diff].mean()
    # and the samples follow their class means: nearest-class-mean accuracy well above chance on val data
    pred = torch.cdist(d["x_val"], means).argmin(dim=1)
    assert (pred == d["y_val"]).float().mean() > 0.3
    # super-class errors are rarer than class errors (a confusion stays mostly inside the super-class)
    wrong = pred != d["y_val"]
    assert (parents[pred] == parents[d["y_val"]])[wrong].float().mean() > 0.5


@pytest.mark.parametrize("kwargs,match", [
    ({"num_super": 0}, "num_super must be a positive integer"),
    ({"num_super": 1, "classes_per_super": 1}, "at least two classes"),
    ({"noise": -1.0}, "noise must be a number >= 0"),
    ({"batch_size": 0}, r"batch_size=0 is not supported; accepted values: an int >= 1"),
])
def test_gaussian_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalGaussianDataModule(**kwargs)


def test_loader_before_setup():
    with pytest.raises(RuntimeError, match="call setup"):
        HierarchicalGaussianDataModule().train_dataloader()


# ----------------------------------------------------------------------------- offline digits hierarchy
def test_digits_hierarchy_batches_match_plain_digits():
    dm = HierarchicalDigitsDataModule(batch_size=32, flatten=True)
    assert dm.hierarchy == [0, 1, 1, 0, 2, 0, 2, 1, 1, 0] == list(DIGITS_COARSE_LABELS)
    assert (dm.num_classes, dm.num_super_classes, dm.in_features) == (10, 3, 64)
    assert Hierarchy.parse("digits") == Hierarchy.parse(dm.hierarchy)
    dm.setup("fit")
    plain = DigitsDataModule(batch_size=32, flatten=True)
    plain.setup("fit")
    for ours, theirs in ((dm.train_set, plain.train_set), (dm.val_set, plain.val_set)):  # same split and pixels
        assert torch.equal(ours.tensors[0], theirs.tensors[0]) and torch.equal(ours.tensors[1], theirs.tensors[1])
    x, y, yc = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 64) and yc.tolist() == [DIGITS_COARSE_LABELS[v] for v in y.tolist()]
    images = HierarchicalDigitsDataModule(return_coarse=False)
    images.setup()
    batch = next(iter(images.train_dataloader()))
    assert len(batch) == 2 and batch[0].shape[1:] == (1, 8, 8)
    custom = HierarchicalDigitsDataModule(hierarchy=[0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    custom.setup()
    x, y, yc = next(iter(custom.train_dataloader()))
    assert yc.tolist() == [int(v >= 5) for v in y.tolist()] and custom.num_super_classes == 2


def test_digits_grouping_follows_its_documented_rule_and_is_genuine():
    """Ward clustering of the class-mean images into 4 clusters, singleton {0} merged into the nearest
    cluster on average; digits of one super-class are closer to each other than to the others."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.datasets import load_digits

    data = load_digits()
    means = np.stack([data.data[data.target == c].mean(0) / 16 for c in range(10)])
    labels = fcluster(linkage(means, "ward"), 4, "maxclust")
    clusters = {tuple(int(d) for d in np.flatnonzero(labels == k)) for k in set(labels)}
    assert clusters == {(0,), (3, 5, 9), (1, 2, 7, 8), (4, 6)}
    dist = np.linalg.norm(means[:, None] - means[None], axis=2)
    nearest = min((c for c in clusters if c != (0,)), key=lambda c: dist[0, list(c)].mean())
    assert set(DIGITS_SUPERCLASSES) == (clusters - {(0,), nearest}) | {tuple(sorted((0, *nearest)))}
    parents = np.array(DIGITS_COARSE_LABELS)
    same = (parents[:, None] == parents[None]) & ~np.eye(10, dtype=bool)
    diff = parents[:, None] != parents[None]
    assert dist[same].mean() == pytest.approx(1.83, abs=0.005) and dist[diff].mean() == pytest.approx(2.16, abs=0.005)


@pytest.mark.parametrize("hierarchy,match", [
    ([0, 1, 2], "super-class id .* of each of the 10 digits"),
    ([0, 0, 0, 0, 0, 2, 2, 2, 2, 2], r"super-class id\(s\) \[1\] have no digit"),
    ([0, 1, 1, 0, 2, 0, 2, 1, 1, -1], "an int >= 0"),
])
def test_digits_hierarchy_bad_arguments(hierarchy, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalDigitsDataModule(hierarchy=hierarchy)
    with pytest.raises(ValueError, match=r"batch_size=.* is not supported; accepted values: an int >= 1"):
        HierarchicalDigitsDataModule(batch_size=0)
