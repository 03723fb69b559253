"""Node-classification DataModules (full-batch, one graph): KarateClub, a synthetic graph, Planetoid.

Every module yields the whole graph as one torch-geometric ``Batch`` per epoch (train, val and test
loaders serve the same graph) with boolean ``train_mask`` / ``val_mask`` / ``test_mask``;
:class:`~lightning_hyper.models.graph.GraphClassifier` picks the nodes of each stage by mask.
Attributes after ``setup``: ``num_features``, ``num_classes``, ``data``.

* :class:`KarateClubDataModule` — Zachary's karate club (34 nodes, 4 communities, bundled with
  torch-geometric, offline). The official mask has one training node per class; the other 30 nodes
  are split into validation and test by a seeded permutation (``val_fraction``).
* :class:`SyntheticGraphDataModule` — a ``FakeDataset``-style random graph, but learnable and
  seeded: a stochastic block model (edge probability ``p_in`` inside a class, ``p_out`` across) with
  Gaussian node features around random class centers.
* :class:`PlanetoidDataModule` — Cora / CiteSeer / PubMed (Kipf & Welling's public split) for users
  who have the raw ``ind.<name>.*`` files under ``<root>/<name>/raw``; never downloads unless
  ``download=True``.
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_hyper.functional.checks import check_fraction

__all__ = ["GraphDataModule", "KarateClubDataModule", "PlanetoidDataModule", "SyntheticGraphDataModule"]

PLANETOID_NAMES = ("Cora", "CiteSeer", "PubMed")
_PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def _split_rest(mask: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split the nodes outside ``mask`` into validation and test masks (seeded permutation)."""
    rest = (~mask).nonzero().view(-1)
    rest = rest[torch.randperm(rest.numel(), generator=generator)]
    n_val = int(round(val_fraction * rest.numel()))
    val, test = torch.zeros_like(mask), torch.zeros_like(mask)
    val[rest[:n_val]] = True
    test[rest[n_val:]] = True
    return val, test


def _per_class_mask(y: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    mask = torch.zeros(y.numel(), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:per_class]]
        mask[idx] = True
    return mask


class GraphDataModule(L.LightningDataModule):
    """Base: serves ``self.data`` (built by :meth:`build`) as a single-graph loader for every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.data: Any = None

    def build(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.build()
            for key in ("train_mask", "val_mask", "test_mask"):
                if getattr(self.data, key, None) is None:
                    raise ValueError(f"{type(self).__name__}: the graph has no {key}")

    @property
    def num_features(self) -> int:
        self.setup()
        return int(self.data.num_features)

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.data.y.max()) + 1

    def _loader(self):
        from torch_geometric.loader import DataLoader

        self.setup()
        return DataLoader([self.data], batch_size=1, shuffle=False)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        return self._loader()


class KarateClubDataModule(GraphDataModule):
    """Zachary's karate club (torch-geometric ``KarateClub``; 34 nodes, 34 one-hot features, 4 classes).

    Args:
        val_fraction: share of the non-training nodes used for validation (the rest is the test set).
        train_per_class: ``None`` keeps the official mask (1 node per class); an integer draws that
            many training nodes per class instead.
        seed: seeds the splits.
    """

    def __init__(self, val_fraction: float = 0.5, train_per_class: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.val_fraction = check_fraction("val_fraction", val_fraction, allow_one=True)
        if train_per_class is not None and (not isinstance(train_per_class, int) or train_per_class < 1):
            raise ValueError(f"train_per_class must be None or a positive integer, got {train_per_class!r}")
        self.train_per_class = train_per_class
        self.seed = seed
        self.save_hyperparameters()

    def build(self):
        from torch_geometric.datasets import KarateClub

        data = KarateClub()[0]
        gen = torch.Generator().manual_seed(self.seed)
        if self.train_per_class is not None:
            data.train_mask = _per_class_mask(data.y, self.train_per_class, gen)
        data.val_mask, data.test_mask = _split_rest(data.train_mask, self.val_fraction, gen)
        return data


class SyntheticGraphDataModule(GraphDataModule):
    """Seeded stochastic-block-model graph with class-dependent Gaussian features (offline, learnable).

    Node ``i`` of class ``c`` gets ``x_i = signal · μ_c + N(0, I)`` with ``μ_c ~ N(0, I/num_features)·√num_features``
    normalized to unit norm; an edge joins nodes of the same class with probability ``p_in`` and of
    different classes with ``p_out`` (undirected, no self loops).

    Args:
        num_nodes, num_classes, num_features: graph size.
        p_in, p_out: edge probabilities within / across classes.
        signal: feature signal-to-noise scale.
        train_per_class: labelled training nodes per class; the rest is split by ``val_fraction``.
        seed: seeds everything.
    """

    def __init__(self, num_nodes: int = 200, num_classes: int = 4, num_features: int = 16, p_in: float = 0.1,
                 p_out: float = 0.01, signal: float = 1.0, train_per_class: int = 10, val_fraction: float = 0.3,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value in (("num_nodes", num_nodes), ("num_classes", num_classes), ("num_features", num_features),
                            ("train_per_class", train_per_class)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_classes < 2 or num_nodes < num_classes:
            raise ValueError(f"need num_classes >= 2 and num_nodes >= num_classes, got {num_classes}, {num_nodes}")
        self.p_in = check_fraction("p_in", p_in, allow_one=True)
        self.p_out = check_fraction("p_out", p_out, allow_one=True)
        self.val_fraction = check_fraction("val_fraction", val_fraction, allow_one=True)
        self.num_nodes, self._num_classes, self._num_features = num_nodes, num_classes, num_features
        self.signal, self.train_per_class, self.seed = float(signal), train_per_class, seed
        self.save_hyperparameters()

    def build(self):
        from torch_geometric.data import Data

        gen = torch.Generator().manual_seed(self.seed)
        n, c, f = self.num_nodes, self._num_classes, self._num_features
        y = torch.arange(n) % c
        y = y[torch.randperm(n, generator=gen)]
        centers = torch.randn(c, f, generator=gen)
        centers = centers / centers.norm(dim=1, keepdim=True)
        x = self.signal * centers[y] * f**0.5 / 2 + torch.randn(n, f, generator=gen)
        prob = torch.where(y[:, None] == y[None, :], self.p_in, self.p_out)
        upper = torch.triu(torch.rand(n, n, generator=gen) < prob, diagonal=1)
        row, col = upper.nonzero(as_tuple=True)
        edge_index = torch.cat([torch.stack([row, col]), torch.stack([col, row])], dim=1)
        data = Data(x=x, edge_index=edge_index, y=y)
        data.train_mask = _per_class_mask(y, self.train_per_class, gen)
        data.val_mask, data.test_mask = _split_rest(data.train_mask, self.val_fraction, gen)
        return data


class PlanetoidDataModule(GraphDataModule):
    """Planetoid citation graphs (Cora, CiteSeer, PubMed) with the public Kipf & Welling split.

    Args:
        root: folder holding ``<name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``
            (torch-geometric's layout; processed tensors are cached in ``<name>/processed``).
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"`` (case-insensitive).
        download: allow torch-geometric to download missing files (off by default: this library
            never needs the network).
        normalize_features: row-normalize the bag-of-words features (Kipf & Welling).
    """

    def __init__(self, root: str, name: str = "Cora", download: bool = False, normalize_features: bool = True) -> None:
        super().__init__()
        canonical = {n.lower(): n for n in PLANETOID_NAMES}
        if not isinstance(name, str) or name.lower() not in canonical:
            raise ValueError(f"name={name!r} is not supported; accepted values: {list(PLANETOID_NAMES)}")
        self.root, self.name = str(root), canonical[name.lower()]
        self.download, self.normalize_features = download, normalize_features
        self.save_hyperparameters()

    def raw_paths(self) -> list[str]:
        raw = os.path.join(self.root, self.name, "raw")
        return [os.path.join(raw, f"ind.{self.name.lower()}.{f}") for f in _PLANETOID_FILES]

    def build(self):
        from torch_geometric.datasets import Planetoid
        from torch_geometric.transforms import NormalizeFeatures

        missing = [p for p in self.raw_paths() if not os.path.exists(p)]
        if missing and not self.download:
            raise FileNotFoundError(
                f"PlanetoidDataModule(name={self.name!r}): raw files missing under {self.root!r}: "
                f"{[os.path.basename(p) for p in missing]}. Place the Planetoid files there or pass download=True."
            )
        transform = NormalizeFeatures() if self.normalize_features else None
        return Planetoid(self.root, self.name, split="public", transform=transform)[0]
