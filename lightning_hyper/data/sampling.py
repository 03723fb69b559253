"""Shuffling that a resumed run reproduces: the order of epoch ``e`` is a pure function of ``(seed, e)``.

``DataLoader(shuffle=True)`` draws each epoch's permutation from the global torch RNG, whose state
Lightning does not checkpoint, so a run resumed from a checkpoint sees other batches than an
uninterrupted one. :class:`EpochShuffleSampler` seeds a fresh generator per epoch instead; Lightning
calls ``set_epoch`` before every training epoch (also after restoring the epoch counter from a
checkpoint). It subclasses ``RandomSampler``, so under DDP Lightning swaps it for a
``DistributedSampler(shuffle=True)`` (seeded from ``seed_everything``) as it does for ``shuffle=True``.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["EpochShuffleSampler", "epoch_loader", "epoch_sampler"]

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct epochs -> distinct seeds


class EpochShuffleSampler(RandomSampler):
    """Random permutation of ``range(len(data_source))`` seeded from ``(seed, epoch)``.

    The order a seed gives is kept fixed across versions (``seed + golden * (epoch + 1)``, as released), so
    published results stay reproducible; new seed derivations use :mod:`lightning_hyper.functional.seeding`.

    Args:
        data_source: a sized (map-style) dataset.
        seed: ``None`` (default): ``torch.initial_seed()`` when an epoch starts, i.e. the seed given to
            ``seed_everything`` / ``torch.manual_seed`` (unseeded processes still get a random order).

    ``set_epoch(e)`` fixes the epoch of the next pass (Lightning calls it); without it each pass
    advances the epoch by one, so plain PyTorch loops also get a new order every epoch.
    """

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {seed!r}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The indices of epoch ``epoch`` (what the pass of that epoch yields)."""
        seed = torch.initial_seed() if self.seed is None else self.seed
        gen = torch.Generator().manual_seed((seed + _GOLDEN * (epoch + 1)) % 2**64)
        return torch.randperm(len(self.data_source), generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1
        yield from self.order(epoch)


def epoch_sampler(dataset: Sized, shuffle: bool, seed: int | None = None) -> EpochShuffleSampler | None:
    """``sampler=`` argument of a DataModule's loader: an :class:`EpochShuffleSampler` if ``shuffle``, else
    ``None`` (the DataLoader's sequential order)."""
    return EpochShuffleSampler(dataset, seed) if shuffle else None


def epoch_loader(dataset: Any, *, batch_size: int, shuffle: bool, owner: str = "DataModule", num_workers: int = 0,
                 pin_memory: bool = False, seed: int | None = None) -> DataLoader:
    """The DataModules' loader: an :func:`epoch_sampler` order, persistent workers when ``num_workers > 0``;
    a clear error if ``setup()`` has not built ``dataset`` yet (``owner`` names the DataModule)."""
    if dataset is None:
        raise RuntimeError(f"{owner}: call setup() before asking for a dataloader")
    return DataLoader(dataset, batch_size=batch_size, sampler=epoch_sampler(dataset, shuffle, seed),
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
