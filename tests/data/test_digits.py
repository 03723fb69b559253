"""DigitsDataModule: split, scaling, shapes (independent reference: sklearn directly)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_hyper.data import DigitsDataModule


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_split_sizes_stratified_and_disjoint():
    dm = DigitsDataModule(batch_size=100)
    dm.setup("fit")
    x_tr, y_tr = _all(dm.train_dataloader())
    x_va, y_va = _all(dm.val_dataloader())
    assert len(x_tr) + len(x_va) == 1797
    assert len(x_va) == int(np.ceil(0.3 * 1797))  # sklearn rounds the test share up
    assert x_tr.shape[1:] == (1, 8, 8) and x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    # stratified: per-class shares match the full data within one sample
    full = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(np.bincount(y_va.numpy(), minlength=10) - 0.3 * full) <= 1)
    # every original image appears exactly once (as a multiset), scaled by 1/16
    ref = sorted(tuple(r) for r in (load_digits().data / 16.0).astype(np.float32))
    got = sorted(tuple(r) for r in torch.cat([x_tr, x_va]).reshape(-1, 64).numpy())
    assert got == ref
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0 and x_tr.max() == 1.0


def test_labels_follow_images():
    data = load_digits()
    lookup = {tuple(r): t for r, t in zip(data.data, data.target)}
    dm = DigitsDataModule(flatten=True)
    dm.setup()
    x, y = _all(dm.val_dataloader())
    assert x.shape[1:] == (64,)
    assert all(lookup[tuple((xi * 16).round().numpy().astype(np.float64))] == yi for xi, yi in zip(x, y.tolist()))


def test_seed_changes_split_and_is_deterministic():
    def val_images(seed):
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return dm.val_set.tensors[0]

    torch.testing.assert_close(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_test_loader_is_val_split_and_attributes():
    dm = DigitsDataModule(val_fraction=0.5)
    dm.setup("test")
    torch.testing.assert_close(_all(dm.test_dataloader())[0], _all(dm.val_dataloader())[0])
    assert (dm.num_classes, dm.in_channels, dm.input_size) == (10, 1, 8)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (64, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_loader_before_setup_errors():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()
