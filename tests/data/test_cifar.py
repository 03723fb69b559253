"""CIFAR DataModules on a tiny fake torchvision file tree written by the test.

The fake batches use torchvision's pickle format (data_batch_1..5, test_batch, batches.meta for
CIFAR-10; train, test, meta for CIFAR-100). Their MD5 sums cannot match the real files, so the
tests that load them replace torchvision's ``check_integrity`` in ``torchvision.datasets.cifar``
by an existence-only check (``md5=None``); the library code itself is unpatched, and one test
shows that the real MD5 check rejects the fake tree with a clear error.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets.utils import check_integrity

from lightning_hyper.data import CIFAR10DataModule, CIFAR100DataModule, CIFAR100HierarchyDataModule
from lightning_hyper.data.cifar import SyntheticCIFAR
from lightning_hyper.data.hierarchy import CIFAR100_COARSE_LABELS

PER_BATCH, N_TEST = 4, 6


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R(1024) G(1024) B(1024)


def write_fake_cifar10(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _images(rng, PER_BATCH), rng.integers(0, 10, PER_BATCH).tolist()
        _dump(base / f"data_batch_{i}", {"data": x, "labels": y, "batch_label": f"training batch {i} of 5"})
        train_x.append(x)
        train_y += y
    test_x, test_y = _images(rng, N_TEST), rng.integers(0, 10, N_TEST).tolist()
    _dump(base / "test_batch", {"data": test_x, "labels": test_y, "batch_label": "testing batch 1 of 1"})
    _dump(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": PER_BATCH})
    return {"train_x": np.concatenate(train_x), "train_y": np.array(train_y), "test_x": test_x,
            "test_y": np.array(test_y)}


def write_fake_cifar100(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    train_x, train_y = _images(rng, 10), rng.integers(0, 100, 10)
    test_x, test_y = _images(rng, 5), rng.integers(0, 100, 5)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _dump(base / name, {"data": x, "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()})
    _dump(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                          "coarse_label_names": [f"c{i}" for i in range(20)]})
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: check_integrity(fpath, None))


def _normalize(raw_chw: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.as_tensor(raw_chw, dtype=torch.float32) / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_missing_or_unverified_tree_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*root=.*download=True.*if_missing='synthetic'"):
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")
    write_fake_cifar10(tmp_path)  # files exist, but torchvision's real MD5 check rejects them
    with pytest.raises(FileNotFoundError, match="root="):
        CIFAR10DataModule(root=str(tmp_path)).setup("test")


def test_download_false_never_downloads(tmp_path, no_md5, monkeypatch):
    write_fake_cifar10(tmp_path)

    def boom(self):
        raise AssertionError("download() called")

    monkeypatch.setattr(tv_cifar.CIFAR10, "download", boom)
    dm = CIFAR10DataModule(root=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_BATCH


def test_cifar10_eval_images_are_normalized_exactly(tmp_path, no_md5):
    ref = write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4)
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.input_size) == (10, 3, 32)
    assert len(dm.train_set) == 5 * PER_BATCH and len(dm.val_set) == N_TEST
    xs, ys = zip(*dm.test_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    expected = _normalize(ref["test_x"].reshape(-1, 3, 32, 32), dm.mean, dm.std)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    assert y.tolist() == ref["test_y"].tolist()
    # val = test set by default
    torch.testing.assert_close(torch.cat([b[0] for b in dm.val_dataloader()]), x)


def test_cifar10_train_augmentation_is_pad4_crop_and_flip(tmp_path, no_md5):
    ref = write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path))
    dm.setup("fit")
    raw = ref["train_x"].reshape(-1, 3, 32, 32)
    torch.manual_seed(0)
    flips = set()
    for i in range(len(raw)):
        img, label = dm.train_set[i]
        assert label == ref["train_y"][i] and img.shape == (3, 32, 32)
        padded = np.pad(raw[i], ((0, 0), (4, 4), (4, 4)))  # zero padding before normalization
        candidates = [
            (flip, _normalize(np.ascontiguousarray(c[:, :, ::-1] if flip else c), dm.mean, dm.std))
            for a in range(9)
            for b in range(9)
            for c in [padded[:, a : a + 32, b : b + 32]]
            for flip in (False, True)
        ]
        matches = [flip for flip, cand in candidates if torch.allclose(img, cand, atol=1e-5)]
        assert matches, f"training image {i} is not a 4-px-padded crop (+ optional flip) of the original"
        flips.add(matches[0])
    assert flips == {False, True}  # both flipped and unflipped crops occur over 20 draws


def test_val_size_holds_out_unaugmented_training_images(tmp_path, no_md5):
    ref = write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=5, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    i = dm.val_set.indices[0]
    img, label = dm.val_set[0]
    torch.testing.assert_close(img, _normalize(ref["train_x"][i].reshape(3, 32, 32), dm.mean, dm.std),
                               rtol=0, atol=1e-5)
    assert label == ref["train_y"][i]
    assert len(dm.test_set) == N_TEST
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(root=str(tmp_path), val_size=20).setup("fit")


def test_cifar100_fake_tree(tmp_path, no_md5):
    ref = write_fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=5, augment=False)
    dm.setup("fit")
    assert dm.num_classes == 100 and dm.mean != CIFAR10DataModule.mean
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == ref["test_y"].tolist()
    torch.testing.assert_close(x, _normalize(ref["test_x"].reshape(-1, 3, 32, 32), dm.mean, dm.std), rtol=0, atol=1e-5)
    # augment=False: training images are only normalized
    torch.testing.assert_close(dm.train_set[0][0], _normalize(ref["train_x"][0].reshape(3, 32, 32), dm.mean, dm.std),
                               rtol=0, atol=1e-5)


def test_trains_a_classifier_on_the_fake_tree(tmp_path, no_md5):
    from lightning_hyper.models import HypersphericalClassifier

    write_fake_cifar10(tmp_path / "data")
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), batch_size=8)
    model = HypersphericalClassifier(backbone="resnet20", num_classes=10)
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/acc" in trainer.callback_metrics


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        CIFAR10DataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_size"):
        CIFAR100DataModule(val_size=-1)
    with pytest.raises(ValueError, match=r"if_missing must be one of \['error', 'synthetic'\], got 'fake'"):
        CIFAR10DataModule(if_missing="fake")
    with pytest.raises(ValueError, match="synthetic_size"):
        CIFAR100DataModule(synthetic_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticCIFAR(4, 0)
    with pytest.raises(ValueError, match="noise"):
        SyntheticCIFAR(4, 2, noise=-1.0)


# ------------------------------------------------------------------ if_missing="synthetic"
def test_synthetic_stand_in_when_folder_is_absent(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nothing"), batch_size=16, if_missing="synthetic", synthetic_size=50,
                           augment=False)
    with pytest.warns(UserWarning, match=r"(?s)root=.*download=False.*SYNTHETIC.*NOT CIFAR RESULTS"):
        dm.setup("fit")
    assert dm.using_synthetic
    assert len(dm.train_set) == 50 and len(dm.test_set) == 10 and dm.val_set is dm.test_set
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # same pipeline as CIFAR: uint8 HWC images -> ToTensor -> per-channel normalization
    raw = dm.test_set.data.transpose(0, 3, 1, 2)  # (N, 3, 32, 32)
    torch.testing.assert_close(x, _normalize(raw, dm.mean, dm.std), rtol=0, atol=1e-5)
    assert y.tolist() == dm.test_set.targets
    # balanced labels over all classes
    assert sorted(np.bincount(dm.train_set.targets, minlength=10).tolist()) == [5] * 10


def test_synthetic_is_seeded_and_learnable():
    a, b = SyntheticCIFAR(200, 10, seed=3), SyntheticCIFAR(200, 10, seed=3)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.targets == b.targets
    assert not np.array_equal(a.data, SyntheticCIFAR(200, 10, seed=4).data)
    test = SyntheticCIFAR(100, 10, train=False, seed=3)
    assert not np.array_equal(a.data[:100], test.data)  # another noise stream
    # class-dependent: a nearest-class-mean classifier fitted on the training split (float64) is
    # near perfect on the test split; with shuffled training labels it is at chance level
    def ncm_accuracy(train_x, train_y, x, y):
        means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
        d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        return float((d.argmin(1) == y).mean())

    tx, ty = a.data.reshape(200, -1).astype(np.float64), np.array(a.targets)
    vx, vy = test.data.reshape(100, -1).astype(np.float64), np.array(test.targets)
    assert ncm_accuracy(tx, ty, vx, vy) > 0.95
    assert ncm_accuracy(tx, np.random.default_rng(0).permutation(ty), vx, vy) < 0.5


def test_synthetic_only_when_absent_and_not_downloading(tmp_path):
    write_fake_cifar10(tmp_path)  # present but fails the MD5 check: still an error, never a silent stand-in
    with pytest.raises(FileNotFoundError, match="root="):
        CIFAR10DataModule(root=str(tmp_path), if_missing="synthetic").setup("test")
    dm = CIFAR10DataModule(root=str(tmp_path / "absent"), download=True, if_missing="synthetic")
    with pytest.raises(FileNotFoundError):  # download=True: the real data is wanted (prepare_data not run here)
        dm.setup("test")
    assert not dm.using_synthetic


def test_synthetic_cifar100_hierarchy_batches(tmp_path):
    dm = CIFAR100HierarchyDataModule(root=str(tmp_path), batch_size=32, if_missing="synthetic", synthetic_size=200)
    with pytest.warns(UserWarning, match="NOT CIFAR"):
        dm.setup("fit")
    x, y, coarse = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and int(y.max()) < 100
    assert coarse.tolist() == [CIFAR100_COARSE_LABELS[i] for i in y.tolist()]
    assert len(dm.test_set) == 40
