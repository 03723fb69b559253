"""CIFAR-10 / CIFAR-100 over torchvision, for users who have the data (nothing downloads by default).

``root`` is the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), the layout
torchvision's ``CIFAR10(root)`` expects. With ``download=False`` (default) a missing or corrupted
tree raises a ``FileNotFoundError`` naming ``root``, ``download`` and ``if_missing``;
``download=True`` lets torchvision fetch the archive once in ``prepare_data``. torchvision verifies
every batch file by its MD5 checksum.

``if_missing="synthetic"`` (used by the shipped CIFAR configs, so that they run on a machine without
the data): when the folder is *absent* and ``download=False``, a seeded CIFAR-shaped stand-in
(:class:`SyntheticCIFAR`: 32x32 RGB, ``num_classes`` classes, ``synthetic_size`` training and
``synthetic_size // 5`` test images) is used instead, with a loud rank-zero warning that the numbers
are not CIFAR numbers. A folder that exists but fails verification is still an error.

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
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.data.sampling import epoch_loader

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "IF_MISSING", "SyntheticCIFAR"]

#: accepted values of ``if_missing``
IF_MISSING = ("error", "synthetic")


class SyntheticCIFAR(Dataset):
    r"""Seeded, learnable CIFAR-shaped stand-in: 32x32 RGB ``uint8`` images and integer labels.

    Class ``c`` has a prototype: a 4x4 grid of random RGB colours (drawn from ``seed``, the same for
    the training and the test split) upsampled to 32x32 by 8x8 blocks. Image ``i`` of class
    :math:`y_i` (labels balanced, ``i mod num_classes``, then shuffled) is
    :math:`\mathrm{clip}(P_{y_i} + \sigma\,\xi_i, 0, 1)` with :math:`\xi_i \sim N(0, I)` per pixel,
    quantized to ``uint8``; the noise stream differs between ``train=True`` and ``False``. Items are
    ``(transform(PIL image), label)``, exactly what torchvision's ``CIFAR10`` returns, so the same
    augmentation and normalization apply. Nothing here is CIFAR: it only lets pipelines run offline.

    Args:
        num_samples: number of images.
        num_classes: number of classes (10 or 100 for the CIFAR stand-ins).
        train: which noise stream (training or test split).
        seed: seed of the prototypes and the noise.
        noise: :math:`\sigma` (pixel values in [0, 1]).
        transform: applied to each PIL image (``None``: the PIL image is returned).
    """

    def __init__(self, num_samples: int, num_classes: int, train: bool = True, seed: int = 0, noise: float = 0.25,
                 transform: Callable[[Any], Any] | None = None) -> None:
        for name, v in (("num_samples", num_samples), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"noise must be a number >= 0, got {noise!r}")
        rng = np.random.default_rng([seed, 0])
        prototypes = rng.random((num_classes, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)  # (C, 32, 32, 3)
        rng = np.random.default_rng([seed, 1 if train else 2])
        targets = rng.permutation(np.arange(num_samples) % num_classes)
        images = prototypes[targets] + noise * rng.standard_normal((num_samples, 32, 32, 3))
        self.data: np.ndarray = np.round(255 * np.clip(images, 0.0, 1.0)).astype(np.uint8)  # (N, 32, 32, 3), HWC
        self.targets: list[int] = targets.tolist()
        self.classes = [f"synthetic_{c}" for c in range(num_classes)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) as a DataModule.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (torchvision layout).
        batch_size: mini-batch size (128 in the MHE experiments).
        download: let torchvision download the archive into ``root`` (off by default).
        augment: random crop (4-px padding) + horizontal flip for training.
        val_size: training images held out for validation (0: validate on the test set).
        seed: seed of the held-out selection (and of the synthetic stand-in).
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        if_missing: what to do when the CIFAR folder is absent under ``root`` and ``download`` is
            false: ``"error"`` (default) raises a ``FileNotFoundError``; ``"synthetic"`` uses
            :class:`SyntheticCIFAR` (``synthetic_size`` training / ``synthetic_size // 5`` test
            images) and warns loudly that the results are not CIFAR results.
        synthetic_size: training images of the synthetic stand-in (only with ``if_missing="synthetic"``).
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
        if_missing: str = "error",
        synthetic_size: int = 1000,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size must be a non-negative integer, got {val_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if if_missing not in IF_MISSING:
            raise ValueError(f"if_missing must be one of {list(IF_MISSING)}, got {if_missing!r}")
        if isinstance(synthetic_size, bool) or not isinstance(synthetic_size, int) or synthetic_size < 1:
            raise ValueError(f"synthetic_size must be a positive integer, got {synthetic_size!r}")
        self.save_hyperparameters()
        self.root = str(root)
        self.batch_size = batch_size
        self.download = download
        self.augment = augment
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.if_missing = if_missing
        self.synthetic_size = synthetic_size
        #: True once the synthetic stand-in replaced the missing CIFAR folder
        self.using_synthetic = False
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

    def _synthetic_wanted(self) -> bool:
        """``if_missing="synthetic"``, ``download=False`` and no CIFAR folder under ``root`` (warns once)."""
        if self.using_synthetic:
            return True
        if self.if_missing != "synthetic" or self.download or (Path(self.root) / self._folder).exists():
            return False
        self.using_synthetic = True
        n_test = max(1, self.synthetic_size // 5)
        rank_zero_warn(
            f"\n{'!' * 78}\n{type(self).__name__}: no {self._folder}/ under root={self.root!r} "
            f"({Path(self.root).resolve()}) and download=False, so if_missing='synthetic' uses a SYNTHETIC "
            f"CIFAR-shaped stand-in ({self.synthetic_size} training / {n_test} test images, {self.num_classes} "
            f"classes, seed {self.seed}). THE NUMBERS OF THIS RUN ARE NOT CIFAR RESULTS. Put the extracted "
            f"torchvision folder under root (or set download=True) for the real experiment.\n{'!' * 78}",
            category=UserWarning,
        )
        return True

    def _make(self, train: bool, transform: Any) -> Dataset:
        if self._synthetic_wanted():
            n = self.synthetic_size if train else max(1, self.synthetic_size // 5)
            return SyntheticCIFAR(n, self.num_classes, train=train, seed=self.seed, transform=transform)
        try:
            return self._dataset_cls()(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{type(self).__name__}: no valid {self._folder}/ under root={self.root!r} "
                f"({Path(self.root).resolve()}); put the extracted torchvision CIFAR folder there "
                f"or pass download=True, or if_missing='synthetic' for a synthetic stand-in when the "
                f"folder is absent ({err})"
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
        return epoch_loader(dataset, batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)

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
