"""Open-set DataModule (offline) and the LFW-format pairs DataModule on tiny files written here."""
import os

import numpy as np
import pytest
import torch

from lightning_hyper.data.openset import (
    LFWPairsDataModule,
    OpenSetDataModule,
    make_verification_pairs,
    read_lfw_pairs,
)


def test_make_verification_pairs_is_balanced_per_fold_and_valid():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 1)
    a, b, same, fold = make_verification_pairs(labels, num_pairs=40, num_folds=4, seed=3)
    assert a.shape == b.shape == same.shape == fold.shape == (40,)
    assert fold.tolist() == sorted(fold.tolist()) and set(fold.tolist()) == {0, 1, 2, 3}
    for f in range(4):
        assert same[fold == f].sum().item() == 5  # half of each fold
    assert torch.equal(labels[a] == labels[b], same)  # labels agree exactly on same pairs
    assert (a[same] != b[same]).all()  # a same pair uses two distinct samples
    a2, b2, _, _ = make_verification_pairs(labels, 40, 4, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # deterministic
    with pytest.raises(ValueError, match="multiple of 2 \\* num_folds"):
        make_verification_pairs(labels, 30, 4)


def test_openset_digits_splits_classes_and_yields_all_loaders():
    dm = OpenSetDataModule(dataset="digits", heldout_classes=(7, 8, 9), num_pairs=60, batch_size=64)
    dm.setup("fit")
    assert dm.num_classes == 7 and dm.eval_kinds == ("pairs", "openset", "closed")
    xtr, ytr = dm.train_set.tensors
    assert xtr.shape[1:] == (1, 8, 8) and set(ytr.tolist()) == set(range(7))
    # held-out identities never appear in training: compare raw images
    xo = torch.cat([dm.val_open.tensors[0], dm.test_open.tensors[0]])
    assert set(torch.cat([dm.val_open.tensors[1], dm.test_open.tensors[1]]).tolist()) == {7, 8, 9}
    train_rows = {tuple(r.tolist()) for r in xtr.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in xo.flatten(1))
    # val and test open-set halves are disjoint
    v = {tuple(r.tolist()) for r in dm.val_open.tensors[0].flatten(1)}
    assert not any(tuple(r.tolist()) in v for r in dm.test_open.tensors[0].flatten(1))
    pairs, openset, closed = dm.val_dataloader()
    xa, xb, same, fold = next(iter(pairs))
    assert xa.shape == xb.shape == (60, 1, 8, 8) and same.dtype == torch.bool and fold.max() == 9
    x, y = next(iter(openset))
    assert y.min() >= 7
    x, y = next(iter(closed))
    assert y.max() < 7
    assert len(dm.test_dataloader()) == 3


def test_openset_mnist1d_and_flatten_and_class_remap():
    dm = OpenSetDataModule(dataset="mnist1d", heldout_classes=(0, 1), train_classes=(9, 5, 2), num_pairs=20,
                           num_samples=600)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape[1:] == (40,) and set(y.tolist()) == {0, 1, 2}
    assert dm.num_classes == 3
    d = OpenSetDataModule(flatten=True, num_pairs=20)
    d.setup()
    assert d.train_set.tensors[0].shape[1:] == (64,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset": "cifar"}, "dataset='cifar'"),
        ({"heldout_classes": (1, 1)}, "distinct"),
        ({"heldout_classes": (1, 2), "train_classes": (2, 3)}, "overlap"),
        ({"heldout_classes": (9,)}, ">= 2"),
        ({"num_pairs": 50}, "multiple of 2 \\* num_folds"),
        ({"val_fraction": 1.5}, "val_fraction"),
    ],
)
def test_openset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenSetDataModule(**kwargs)


# ------------------------------------------------------------------------------------- LFW
def write_lfw(tmp_path, header=True):
    from PIL import Image

    root = tmp_path / "lfw"
    rng = np.random.default_rng(0)
    people = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 2}
    for name, n in people.items():
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            Image.fromarray(rng.integers(0, 255, (10, 8, 3), dtype=np.uint8)).save(root / name / f"{name}_{i:04d}.jpg")
    lines = (["2\t2"] if header else []) + [
        "Ann_A\t1\t2", "Bob_B\t1\t2", "Ann_A\t1\tBob_B\t2", "Cid_C\t1\tAnn_A\t3",   # fold 0
        "Ann_A\t2\t3", "Cid_C\t1\t2", "Bob_B\t1\tCid_C\t2", "Ann_A\t2\tCid_C\t1",   # fold 1
    ]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    train = tmp_path / "train"
    for k in range(3):
        (train / f"id{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (10, 8), dtype=np.uint8)).save(train / f"id{k}" / f"{i}.png")
    return str(root), str(tmp_path / "pairs.txt"), str(train)


def test_read_lfw_pairs(tmp_path):
    _, pairs_file, _ = write_lfw(tmp_path)
    pairs, folds = read_lfw_pairs(pairs_file)
    assert len(pairs) == 8 and folds == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pairs[0] == ("Ann_A", 1, "Ann_A", 2, True)
    assert pairs[2] == ("Ann_A", 1, "Bob_B", 2, False)
    bad = tmp_path / "bad.txt"
    bad.write_text("2\t2\nAnn_A\t1\n")
    with pytest.raises(ValueError, match="expected 'name i j'"):
        read_lfw_pairs(str(bad))


def test_lfw_datamodule_loads_pairs_and_training_folder(tmp_path):
    root, pairs_file, train = write_lfw(tmp_path)
    dm = LFWPairsDataModule(root, pairs_file, train_root=train, image_size=(12, 8), batch_size=8)
    dm.setup("fit")
    xa, xb, same, fold = next(iter(dm.val_dataloader()))
    assert xa.shape == (8, 3, 12, 8) and same.tolist() == [True, True, False, False] * 2
    assert fold.tolist() == [0] * 4 + [1] * 4
    assert xa.min() >= -127.5 / 128 and xa.max() <= 127.5 / 128  # (v - 127.5) / 128
    # the loaded pixels are the file's pixels, normalized
    from PIL import Image

    img = Image.open(os.path.join(root, "Ann_A", "Ann_A_0001.jpg")).convert("RGB").resize((8, 12), Image.BILINEAR)
    raw = np.asarray(img, np.float32)
    np.testing.assert_allclose(xa[0].numpy(), (raw.transpose(2, 0, 1) - 127.5) / 128, atol=1e-6)
    assert dm.num_classes == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 12, 8) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    gray = LFWPairsDataModule(root, pairs_file, image_size=(10, 8), grayscale=True)
    gray.setup()
    assert next(iter(gray.test_dataloader()))[0].shape[1] == 1
    with pytest.raises(ValueError, match="train_root"):
        gray.train_dataloader()


def test_lfw_datamodule_errors(tmp_path):
    root, pairs_file, _ = write_lfw(tmp_path)
    with pytest.raises(ValueError, match="root="):
        LFWPairsDataModule(str(tmp_path / "nope"), pairs_file)
    with pytest.raises(ValueError, match="pairs_file="):
        LFWPairsDataModule(root, str(tmp_path / "nope.txt"))
    os.remove(os.path.join(root, "Bob_B", "Bob_B_0002.jpg"))
    dm = LFWPairsDataModule(root, pairs_file)
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.setup()
