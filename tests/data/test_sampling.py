"""EpochShuffleSampler: the order of epoch e is a pure function of (seed, e)."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_hyper.data import DigitsDataModule, SyntheticShapesDataModule
from lightning_hyper.data.sampling import EpochShuffleSampler, epoch_sampler

DATA = TensorDataset(torch.arange(50))


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    s = EpochShuffleSampler(DATA, seed=3)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
        assert sorted(orders[-1]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    # the same (seed, epoch) in another sampler object (a resumed run) gives the same order
    other = EpochShuffleSampler(DATA, seed=3)
    other.set_epoch(1)
    assert list(other) == orders[1] == s.order(1)
    # reference: torch.randperm with the documented seed mix
    gen = torch.Generator().manual_seed((3 + 0x9E3779B97F4A7C15 * 2) % 2**64)
    assert orders[1] == torch.randperm(50, generator=gen).tolist()
    assert EpochShuffleSampler(DATA, seed=4).order(1) != orders[1]


def test_without_set_epoch_every_pass_advances_the_epoch():
    s = EpochShuffleSampler(DATA, seed=0)
    first, second = list(s), list(s)
    assert first == s.order(0) and second == s.order(1) and first != second


def test_default_seed_is_the_global_torch_seed():
    torch.manual_seed(7)
    a = list(EpochShuffleSampler(DATA))
    torch.rand(3)  # consuming the global RNG does not change the order (unlike shuffle=True)
    b = list(EpochShuffleSampler(DATA))
    torch.manual_seed(8)
    c = list(EpochShuffleSampler(DATA))
    assert a == b != c


def test_helper_and_bad_seed():
    assert epoch_sampler(DATA, False) is None
    assert isinstance(epoch_sampler(DATA, True, seed=1), EpochShuffleSampler)
    with pytest.raises(TypeError, match="seed"):
        EpochShuffleSampler(DATA, seed=1.5)


def test_datamodules_shuffle_with_it_and_lightning_sees_a_shuffled_loader():
    """Lightning decides DDP sharding (DistributedSampler(shuffle=True)) from isinstance(sampler, RandomSampler)."""
    for dm in (DigitsDataModule(batch_size=16), SyntheticShapesDataModule(train_per_class=2, val_per_class=1,
                                                                          test_per_class=1, num_points=8)):
        dm.setup("fit")
        train, val = dm.train_dataloader(), dm.val_dataloader()
        assert isinstance(train.sampler, EpochShuffleSampler) and isinstance(train.sampler, RandomSampler)
        assert _is_dataloader_shuffled(train)
        assert isinstance(val.sampler, SequentialSampler) and not _is_dataloader_shuffled(val)
        loader = DataLoader(train.dataset, batch_size=4, sampler=train.sampler)
        assert sum(len(b[1]) for b in loader) == len(train.dataset)
