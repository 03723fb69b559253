"""MNIST1DDataModule: offline generation equal to mnist1d.make_dataset, no download, RNGs untouched."""
from __future__ import annotations

import os
import random
import socket

import mnist1d.data
import numpy as np
import pytest
import torch

from lightning_hyper.data import MNIST1DDataModule


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_defaults_are_the_reference_dataset_args():
    ref = mnist1d.data.get_dataset_args(as_dict=True)
    dm = MNIST1DDataModule()
    assert (dm.num_samples, dm.train_split, dm.seed) == (ref["num_samples"], ref["train_split"], ref["seed"])
    assert dm.input_length == ref["final_seq_length"] == 40


def test_matches_make_dataset_without_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST1DDataModule tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(mnist1d.data.requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)

    np.random.seed(123)
    random.seed(7)
    np_state, py_state = np.random.get_state(), random.getstate()
    dm = MNIST1DDataModule(batch_size=64, num_samples=400, seed=3)
    dm.setup("fit")
    # the global NumPy / Python RNG streams are restored
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]
    assert random.getstate() == py_state
    assert os.listdir(tmp_path) == []  # no cache pickle written

    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = 400, 3
    ref = mnist1d.data.make_dataset(args)
    x_tr, y_tr = dm.train_set.tensors
    x_te, y_te = _all(dm.val_dataloader())
    assert x_tr.shape == (320, 1, 40) and x_te.shape == (80, 1, 40)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    np.testing.assert_allclose(x_tr[:, 0].numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_tr.numpy(), ref["y"])
    np.testing.assert_allclose(x_te[:, 0].numpy(), ref["x_test"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_te.numpy(), ref["y_test"])
    torch.testing.assert_close(_all(dm.test_dataloader())[0], x_te)
    assert set(y_tr.tolist()) == set(range(10))


def test_batches_feed_the_1d_backbone():
    from lightning_hyper.models import build_backbone

    dm = MNIST1DDataModule(batch_size=16, num_samples=100)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 40) and y.shape == (16,)
    assert build_backbone("cnn1d")(x).shape == (16, 128)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"batch_size": 0}, "batch_size"), ({"train_split": 1.5}, "train_split"), ({"num_samples": 5}, "num_samples")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(**kwargs)
