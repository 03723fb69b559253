"""Graph DataModules: KarateClub, the synthetic SBM graph, Planetoid on tiny raw files written here."""
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lightning_hyper.data.graphs import KarateClubDataModule, PlanetoidDataModule, SyntheticGraphDataModule


def _check_masks(data):
    masks = torch.stack([data.train_mask, data.val_mask, data.test_mask])
    assert masks.dtype == torch.bool
    assert (masks.sum(0) <= 1).all()  # disjoint
    return masks.sum(1).tolist()


def test_karate_club_splits():
    dm = KarateClubDataModule(val_fraction=0.5, seed=0)
    dm.setup()
    data = dm.data
    assert (dm.num_features, dm.num_classes, data.num_nodes) == (34, 4, 34)
    assert data.train_mask.nonzero().view(-1).tolist() == [0, 4, 8, 24]  # official: one node per class
    assert _check_masks(data) == [4, 15, 15]
    again = KarateClubDataModule(val_fraction=0.5, seed=0)
    again.setup()
    assert torch.equal(again.data.val_mask, data.val_mask)
    other = KarateClubDataModule(train_per_class=3, seed=1)
    other.setup()
    counts = torch.bincount(other.data.y[other.data.train_mask], minlength=4)
    assert counts.tolist() == [3, 3, 3, 3]
    batch = next(iter(dm.train_dataloader()))
    assert batch.x.shape == (34, 34) and hasattr(batch, "test_mask")
    with pytest.raises(ValueError, match="train_per_class"):
        KarateClubDataModule(train_per_class=0)


def test_synthetic_graph_is_seeded_undirected_and_homophilous():
    dm = SyntheticGraphDataModule(num_nodes=120, num_classes=3, num_features=8, p_in=0.2, p_out=0.02,
                                  train_per_class=5, seed=3)
    dm.setup()
    d = dm.data
    assert (dm.num_features, dm.num_classes) == (8, 3)
    ei = d.edge_index
    pairs = set(map(tuple, ei.T.tolist()))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)
    same = (d.y[ei[0]] == d.y[ei[1]]).float().mean().item()
    n_same = sum((d.y == c).sum().item() ** 2 - (d.y == c).sum().item() for c in range(3))
    n_diff = 120 * 119 - n_same
    expected = 0.2 * n_same / (0.2 * n_same + 0.02 * n_diff)  # edge-level homophily of the SBM
    assert abs(same - expected) < 0.08
    assert torch.bincount(d.y[d.train_mask], minlength=3).tolist() == [5, 5, 5]
    assert sum(_check_masks(d)) == 120
    # features carry the class: nearest class mean (from the training nodes) beats chance clearly
    means = torch.stack([d.x[d.train_mask & (d.y == c)].mean(0) for c in range(3)])
    pred = torch.cdist(d.x, means).argmin(1)
    assert (pred[d.test_mask] == d.y[d.test_mask]).float().mean() > 0.6
    again = SyntheticGraphDataModule(num_nodes=120, num_classes=3, num_features=8, p_in=0.2, p_out=0.02,
                                     train_per_class=5, seed=3)
    again.setup()
    assert torch.equal(again.data.x, d.x) and torch.equal(again.data.edge_index, d.edge_index)
    with pytest.raises(ValueError, match="p_in"):
        SyntheticGraphDataModule(p_in=1.5)


def _write_planetoid(raw, name="cora", n_train=3, n_extra=507, test_index=(513, 511, 512, 510), f=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    n_all = n_train + n_extra
    allx = (rng.random((n_all, f)) < 0.5).astype(np.float32)
    allx[:, 0] = 1.0  # no all-zero row
    tx = (rng.random((len(test_index), f)) < 0.5).astype(np.float32)
    tx[:, 0] = 1.0
    ally = np.eye(c)[rng.integers(c, size=n_all)]
    ty = np.eye(c)[rng.integers(c, size=len(test_index))]
    n = n_all + len(test_index)
    graph = {i: [(i + 1) % n, (i - 1) % n] for i in range(n)}
    objs = {"x": sp.csr_matrix(allx[:n_train]), "tx": sp.csr_matrix(tx), "allx": sp.csr_matrix(allx),
            "y": ally[:n_train], "ty": ty, "ally": ally, "graph": graph}
    raw.mkdir(parents=True)
    for key, obj in objs.items():
        with open(raw / f"ind.{name}.{key}", "wb") as fh:
            pickle.dump(obj, fh)
    (raw / f"ind.{name}.test.index").write_text("\n".join(map(str, test_index)) + "\n")
    return allx, tx, ally, ty, n


def test_planetoid_reads_tiny_raw_files(tmp_path):
    test_index = (513, 511, 512, 510)
    allx, tx, ally, ty, n = _write_planetoid(tmp_path / "Cora" / "raw", test_index=test_index)
    dm = PlanetoidDataModule(str(tmp_path), name="cora", normalize_features=False)
    dm.setup()
    d = dm.data
    assert d.num_nodes == n and dm.num_features == 5
    assert _check_masks(d) == [3, 500, 4]
    for k, node in enumerate(test_index):  # tx row k belongs to node test_index[k]
        assert torch.allclose(d.x[node], torch.tensor(tx[k]))
        assert d.y[node].item() == int(ty[k].argmax())
    assert torch.allclose(d.x[:510], torch.tensor(allx))
    assert d.y[:3].tolist() == ally[:3].argmax(1).tolist()
    assert d.edge_index.shape[1] == 2 * n  # the ring, both directions
    normed = PlanetoidDataModule(str(tmp_path), name="Cora")
    normed.setup()
    assert torch.allclose(normed.data.x.sum(1), torch.ones(n))  # row-normalized bag of words


def test_planetoid_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        PlanetoidDataModule(str(tmp_path), name="PubMed").setup()
    with pytest.raises(ValueError, match="accepted values"):
        PlanetoidDataModule(str(tmp_path), name="Reddit")
