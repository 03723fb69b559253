"""CIFAR-10 / CIFAR-100 over torchvision, for users who have the data (nothing downloads by default).

``root`` is the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), the layout
torchvision's ``CIFAR10(root)`` expects. With ``download=False`` (default) a missing or corrupted
tree raises a ``FileNotFoundError`` naming ``root``; ``download=True`` lets torchvision fetch the
archive once in ``prepare_data``. torchvision verifies every batch file by its MD5 checksum.

Training augmentation ("moderate", MHE spec §7.1, following He et al.): 4-pixel zero padding with
a random 32x32 crop, and a random horizontal flip; then per-channel normalization with the
training-set mean/std. Evaluation images are only normalized.

Splits: by default (``val_size=0``) validation and test both use the official 10,000-image test
set, as the papers report test error. ``val_size > 0`` holds out that many training images
(un-augmented, chosen with ``seed``) for validation; the test loader keeps the test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) as a DataModule.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (torchvision layout).
        batch_size: mini-batch size (128 in the MHE experiments).
        download: let torchvision download the archive into ``root`` (off by default).
        augment: random crop (4-px padding) + horizontal flip for training.
        val_size: training images held out for validation (0: validate on the test set).
        seed: seed of the held-out selection.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
    """

    num_classes = 10
    in_channels = 3
    input_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    _folder = "cifar-10-batches-py"

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        download: bool = False,
        augment: bool = True,
        val_size: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size must be a non-negative integer, got {val_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.save_hyperparameters()
        self.root = str(root)
        self.batch_size = batch_size
        self.download = download
        self.augment = augment
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # torchvision dataset class; CIFAR-100 overrides it
    @staticmethod
    def _dataset_cls() -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def _transforms(self, train: bool) -> Any:
        from torchvision import transforms as T

        ops: list[Any] = []
        if train and self.augment:
            ops += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)

    def _make(self, train: bool, transform: Any) -> Dataset:
        try:
            return self._dataset_cls()(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{type(self).__name__}: no valid {self._folder}/ under root={self.root!r} "
                f"({Path(self.root).resolve()}); put the extracted torchvision CIFAR folder there "
                f"or pass download=True ({err})"
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            cls = self._dataset_cls()
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is None:
            self.test_set = self._make(False, self._transforms(train=False))
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_full = self._make(True, self._transforms(train=True))
            if self.val_size == 0:
                self.train_set, self.val_set = train_full, self.test_set
            else:
                n = len(train_full)
                if self.val_size >= n:
                    raise ValueError(f"val_size must be smaller than the {n} training images, got {self.val_size}")
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
                val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
                plain = self._make(True, self._transforms(train=False))  # held-out images: no augmentation
                self.train_set, self.val_set = Subset(train_full, train_idx), Subset(plain, val_idx)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (32x32 RGB, 100 fine classes); ``root`` holds ``cifar-100-python/``.

    Same arguments, augmentation and splits as :class:`CIFAR10DataModule`.
    """

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    _folder = "cifar-100-python"

    @staticmethod
    def _dataset_cls() -> type:
        from torchvision.datasets import CIFAR100

        return CIFAR100
