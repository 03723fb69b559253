"""scikit-learn's bundled 8x8 handwritten digits (offline; 1797 images, 10 classes).

Pixels (0..16) are divided by 16, so inputs lie in [0, 1]. The data are split once into a
training part and a held-out part with ``sklearn.model_selection.train_test_split``
(stratified by label, ``random_state=seed``, held-out share ``val_fraction``): the MHE spec's
CPU protocol (T13) uses 70/30 with ``random_state=0``, the defaults here. The dataset has no
separate test set, so ``val_dataloader`` and ``test_dataloader`` both serve the same held-out
split: ``test/acc`` equals ``val/acc`` and is not an independent estimate.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.data.sampling import epoch_loader

__all__ = ["DigitsDataModule"]


class DigitsDataModule(L.LightningDataModule):
    """sklearn ``load_digits`` as a DataModule.

    Args:
        batch_size: mini-batch size of every loader.
        val_fraction: held-out share in (0, 1) (validation = test split).
        seed: ``random_state`` of the stratified split.
        flatten: yield (B, 64) vectors instead of (B, 1, 8, 8) images.
        num_workers: DataLoader workers.

    Batches are ``(x float32, y int64)``. Attributes: ``num_classes = 10``, ``in_channels = 1``,
    ``input_size = 8``.
    """

    num_classes = 10
    in_channels = 1
    input_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.3,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.flatten = flatten
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        xt = torch.as_tensor(x, dtype=torch.float32) / 16.0
        xt = xt.reshape(-1, 64) if self.flatten else xt.reshape(-1, 1, 8, 8)
        return TensorDataset(xt, torch.as_tensor(y, dtype=torch.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x_tr, x_va, y_tr, y_va = train_test_split(
            data.data, data.target, test_size=self.val_fraction, stratify=data.target, random_state=self.seed
        )
        self.train_set = self._tensors(x_tr, y_tr)
        self.val_set = self._tensors(x_va, y_va)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        return epoch_loader(dataset, batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
