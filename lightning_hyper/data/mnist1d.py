"""MNIST-1D (Greydanus, 2020): 1-D procedurally generated digits, built offline.

The data are generated with ``mnist1d.data.make_dataset(get_dataset_args())`` (5000 sequences of
length 40, 80/20 train/test split, generation seed 42 by default), never with
``mnist1d.data.get_dataset``, which downloads a pickle and writes a cache file in the working
directory. ``make_dataset`` seeds Python's ``random`` and NumPy's global RNG; the module saves and
restores both so that building the data does not change any other random stream.

MNIST-1D has no validation split: ``val_dataloader`` and ``test_dataloader`` both serve the
official test part (``test/acc`` = ``val/acc``). Batches are ``(x float32 (B, 1, 40), y int64)``.
"""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.data.sampling import epoch_loader

__all__ = ["MNIST1DDataModule", "make_mnist1d"]


def make_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42) -> dict[str, np.ndarray]:
    """Generate MNIST-1D offline; returns the dict of ``mnist1d.data.make_dataset`` (global RNGs kept)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D as a DataModule (no download).

    Args:
        batch_size: mini-batch size of every loader.
        num_samples: total number of generated sequences (5000 in the reference dataset).
        train_split: training share of the generated sequences (0.8 in the reference).
        seed: generation seed (42 in the reference).
        num_workers: DataLoader workers.

    Attributes: ``num_classes = 10``, ``in_channels = 1``, ``input_length = 40``.
    """

    num_classes = 10
    in_channels = 1
    input_length = 40

    def __init__(
        self,
        batch_size: int = 128,
        num_samples: int = 5000,
        train_split: float = 0.8,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
            raise ValueError(f"num_samples must be an integer >= 20 (two per class per split), got {num_samples!r}")
        if not 0.0 < float(train_split) < 1.0:
            raise ValueError(f"train_split must be in (0, 1), got {train_split!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.train_split = float(train_split)
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = make_mnist1d(self.num_samples, self.train_split, self.seed)

        def to_set(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            xt = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1)  # (N, 1, 40)
            return TensorDataset(xt, torch.as_tensor(y, dtype=torch.int64))

        self.train_set = to_set(data["x"], data["y"])
        self.test_set = to_set(data["x_test"], data["y_test"])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        return epoch_loader(dataset, batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
