"""Open-set face-verification style DataModules (spec sphereface.md §9.2).

- :class:`OpenSetDataModule` (offline): train a classifier on some classes of sklearn digits or
  MNIST-1D ("identities"), verify pairs built from the **held-out** classes, never seen in
  training. Validation/test loaders, in this order (``eval_kinds``):

  1. ``"pairs"``: ``(x_a, x_b, is_same, fold)`` pairs of held-out-class samples, balanced per
     fold (half same-class, half different-class), ``num_folds`` contiguous folds as in LFW;
  2. ``"openset"``: ``(x, y)`` held-out-class samples (for the angular Fisher score);
  3. ``"closed"``: ``(x, y)`` held-out *samples* of the training classes (closed-set accuracy).

  The held-out-class samples are split in two halves (stratified): pairs and open-set samples of
  ``val_dataloader`` come from one half, those of ``test_dataloader`` from the other. The closed
  set is the same in both (the datasets have no third split).
- :class:`LFWPairsDataModule`: an LFW-format folder (``root/<name>/<name>_0001.jpg``) and a
  ``pairs.txt`` (header ``<folds> <pairs per class per fold>``, then ``name i j`` same pairs and
  ``name1 i name2 j`` different pairs, fold by fold) for users who have the data; optional
  ``train_root`` with one sub-folder per training identity.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.data.sampling import epoch_loader, epoch_sampler

__all__ = ["LFWPairsDataModule", "OpenSetDataModule", "make_verification_pairs", "read_lfw_pairs"]

DATASETS = ("digits", "mnist1d")


def make_verification_pairs(
    labels: Tensor, num_pairs: int, num_folds: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced verification pairs over ``labels``: ``(idx_a, idx_b, is_same, fold)``.

    Pairs are laid out fold by fold (``num_pairs // num_folds`` each; first half of each fold
    same-class, second half different-class, like LFW's ``pairs.txt``). Same pairs use two
    distinct samples of one class (classes drawn uniformly among those with >= 2 samples);
    different pairs use samples of two distinct, uniformly drawn classes.
    """
    labels = torch.as_tensor(labels).long()
    if num_folds < 2 or num_pairs < 2 * num_folds or num_pairs % (2 * num_folds):
        raise ValueError(
            f"num_pairs must be a positive multiple of 2 * num_folds = {2 * num_folds} (balanced folds), "
            f"got num_pairs={num_pairs}, num_folds={num_folds}"
        )
    classes = torch.unique(labels)
    members = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    multi = [c for c, idx in members.items() if idx.numel() >= 2]
    if len(classes) < 2 or not multi:
        raise ValueError("labels must contain at least 2 classes and one class with >= 2 samples to build pairs")
    g = torch.Generator().manual_seed(int(seed))
    per_fold, half = num_pairs // num_folds, num_pairs // num_folds // 2
    cls_list = [int(c) for c in classes]
    a_idx, b_idx, same, folds = [], [], [], []
    for f in range(num_folds):
        for _ in range(half):
            c = multi[int(torch.randint(len(multi), (1,), generator=g))]
            i, j = torch.randperm(members[c].numel(), generator=g)[:2]
            a_idx.append(int(members[c][i])), b_idx.append(int(members[c][j])), same.append(True)
        for _ in range(per_fold - half):
            ci, cj = torch.randperm(len(cls_list), generator=g)[:2]
            ma, mb = members[cls_list[int(ci)]], members[cls_list[int(cj)]]
            a_idx.append(int(ma[int(torch.randint(ma.numel(), (1,), generator=g))]))
            b_idx.append(int(mb[int(torch.randint(mb.numel(), (1,), generator=g))]))
            same.append(False)
        folds += [f] * per_fold
    return torch.tensor(a_idx), torch.tensor(b_idx), torch.tensor(same), torch.tensor(folds)


def _pairs_dataset(x: Tensor, labels: Tensor, num_pairs: int, num_folds: int, seed: int) -> TensorDataset:
    a, b, same, fold = make_verification_pairs(labels, num_pairs, num_folds, seed)
    return TensorDataset(x[a], x[b], same, fold)


class OpenSetDataModule(L.LightningDataModule):
    """Offline open-set verification task on sklearn digits or MNIST-1D.

    Args:
        dataset: ``"digits"`` (1797 8x8 images, batches ``(B, 1, 8, 8)`` or ``(B, 64)`` with
            ``flatten``) or ``"mnist1d"`` (5000 length-40 signals, ``(B, 40)``).
        heldout_classes: classes never used in training (verification identities); default 7, 8, 9.
        train_classes: training classes (default: all others). Training labels are re-indexed to
            ``0..num_classes-1`` in the given order; held-out samples keep their original label.
        val_fraction: share of training-class samples kept for the closed-set loader.
        num_pairs: verification pairs per split (val and test), a multiple of ``2 * num_folds``.
        num_folds: folds of the verification protocol.
        batch_size, num_workers, seed, flatten: as usual (``seed`` fixes splits and pairs).
        num_samples: MNIST-1D only: number of generated samples (the package default is 5000).
    """

    eval_kinds = ("pairs", "openset", "closed")

    def __init__(
        self,
        dataset: str = "digits",
        heldout_classes: Sequence[int] = (7, 8, 9),
        train_classes: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        num_pairs: int = 600,
        num_folds: int = 10,
        batch_size: int = 128,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
        num_samples: int = 5000,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset={dataset!r} is unknown; accepted values: {list(DATASETS)}")
        heldout = [int(c) for c in heldout_classes]
        all_classes = list(range(10))
        if train_classes is None:
            train = [c for c in all_classes if c not in heldout]
        else:
            train = [int(c) for c in train_classes]
        for name, cls in (("heldout_classes", heldout), ("train_classes", train)):
            bad = [c for c in cls if c not in all_classes]
            if bad or len(set(cls)) != len(cls):
                raise ValueError(f"{name} must be distinct classes in 0..9, got {list(cls)}")
        if set(train) & set(heldout):
            raise ValueError(f"train_classes and heldout_classes overlap: {sorted(set(train) & set(heldout))}")
        if len(train) < 2 or len(heldout) < 2:
            raise ValueError(f"need >= 2 training and >= 2 held-out classes, got {train} and {heldout}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        check_positive_int("batch_size", batch_size)
        if num_folds < 2 or num_pairs % (2 * num_folds) or num_pairs <= 0:
            raise ValueError(
                f"num_pairs must be a positive multiple of 2 * num_folds = {2 * num_folds}, got {num_pairs}"
            )
        self.save_hyperparameters()
        self.dataset = dataset
        self.train_classes, self.heldout_classes = train, heldout
        self.num_classes = len(train)
        self.val_fraction = float(val_fraction)
        self.num_pairs, self.num_folds = num_pairs, num_folds
        self.batch_size, self.seed, self.flatten, self.num_workers = batch_size, seed, flatten, num_workers
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 100:
            raise ValueError(f"num_samples must be an integer >= 100, got {num_samples!r}")
        self.num_samples = num_samples
        self.in_channels = 1
        self.input_size = 8 if dataset == "digits" else 40
        self.in_features = 64 if dataset == "digits" else 40
        self._ready = False

    def _load(self) -> tuple[Tensor, Tensor]:
        if self.dataset == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
            x = x.reshape(-1, 64) if self.flatten else x.reshape(-1, 1, 8, 8)
            return x, torch.as_tensor(d.target, dtype=torch.long)
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = 42  # the package's canonical data; the split seed is self.seed
        args.num_samples = self.num_samples
        d = make_dataset(args)
        x = torch.as_tensor(np.concatenate([d["x"], d["x_test"]]), dtype=torch.float32)
        y = torch.as_tensor(np.concatenate([d["y"], d["y_test"]]), dtype=torch.long)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        from sklearn.model_selection import train_test_split

        x, y = self._load()
        is_train_cls = torch.isin(y, torch.tensor(self.train_classes))
        is_held = torch.isin(y, torch.tensor(self.heldout_classes))
        tr_idx = torch.nonzero(is_train_cls).flatten().numpy()
        it, iv = train_test_split(tr_idx, test_size=self.val_fraction, stratify=y[tr_idx].numpy(),
                                  random_state=self.seed)
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[torch.tensor(self.train_classes)] = torch.arange(len(self.train_classes))
        self.train_set = TensorDataset(x[it], remap[y[it]])
        self.closed_set = TensorDataset(x[iv], remap[y[iv]])
        held = torch.nonzero(is_held).flatten().numpy()
        hv, ht = train_test_split(held, test_size=0.5, stratify=y[held].numpy(), random_state=self.seed)
        self.val_open = TensorDataset(x[hv], y[hv])
        self.test_open = TensorDataset(x[ht], y[ht])
        self.val_pairs = _pairs_dataset(x[hv], y[hv], self.num_pairs, self.num_folds, self.seed)
        self.test_pairs = _pairs_dataset(x[ht], y[ht], self.num_pairs, self.num_folds, self.seed + 1)
        self._ready = True

    def _loader(self, ds: Dataset, shuffle: bool = False) -> DataLoader:
        return epoch_loader(ds, batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.val_pairs), self._loader(self.val_open), self._loader(self.closed_set)]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test_pairs), self._loader(self.test_open), self._loader(self.closed_set)]


# ------------------------------------------------------------------------------------- LFW
def read_lfw_pairs(pairs_file: str) -> tuple[list[tuple[str, int, str, int, bool]], list[int]]:
    """Parse an LFW ``pairs.txt``: returns ``[(name_a, i, name_b, j, is_same)]`` and the fold of each pair.

    With a header line ``<folds> <n>`` each fold holds ``2n`` pairs (official LFW: 10 x 600);
    without one, pairs are split into 10 contiguous folds.
    """
    pairs: list[tuple[str, int, str, int, bool]] = []
    header: tuple[int, int] | None = None
    with open(pairs_file) as fh:
        for lineno, line in enumerate(fh, 1):
            tok = line.split()
            if not tok:
                continue
            if lineno == 1 and len(tok) == 2 and all(t.isdigit() for t in tok):
                header = (int(tok[0]), int(tok[1]))
            elif len(tok) == 3:
                pairs.append((tok[0], int(tok[1]), tok[0], int(tok[2]), True))
            elif len(tok) == 4:
                pairs.append((tok[0], int(tok[1]), tok[2], int(tok[3]), False))
            else:
                raise ValueError(
                    f"{pairs_file}:{lineno}: expected 'name i j' or 'name1 i name2 j', got {line.strip()!r}"
                )
    if not pairs:
        raise ValueError(f"{pairs_file}: no pairs found")
    if header is not None:
        per_fold = 2 * header[1]
        if header[0] * per_fold != len(pairs):
            raise ValueError(
                f"{pairs_file}: header says {header[0]} folds x {per_fold} pairs but the file has {len(pairs)}"
            )
        folds = [i // per_fold for i in range(len(pairs))]
    else:
        folds = [i * 10 // len(pairs) for i in range(len(pairs))]
    return pairs, folds


def _load_image(path: str, size: tuple[int, int], grayscale: bool) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if grayscale else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return (torch.from_numpy(arr.copy()) - 127.5) / 128.0  # SphereFace pixel normalization


class _LFWPairs(Dataset):
    def __init__(self, root: str, pairs, folds, ext: str, size, grayscale: bool) -> None:
        self.root, self.pairs, self.folds, self.ext, self.size, self.gray = root, pairs, folds, ext, size, grayscale

    def path(self, name: str, i: int) -> str:
        return os.path.join(self.root, name, f"{name}_{i:04d}.{self.ext}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        na, i, nb, j, same = self.pairs[k]
        return (_load_image(self.path(na, i), self.size, self.gray),
                _load_image(self.path(nb, j), self.size, self.gray),
                torch.tensor(same), torch.tensor(self.folds[k]))


class _ImageFolder(Dataset):
    def __init__(self, root: str, size, grayscale: bool, flip: bool, exts=(".jpg", ".jpeg", ".png", ".bmp")) -> None:
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"train_root={root!r} has no identity sub-folders")
        self.items = [
            (os.path.join(root, c, f), k)
            for k, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(exts)
        ]
        self.size, self.gray, self.flip = size, grayscale, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        path, y = self.items[k]
        x = _load_image(path, self.size, self.gray)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(y)


class LFWPairsDataModule(L.LightningDataModule):
    """LFW-format verification pairs (and optionally a training folder) for users who have the data.

    Args:
        root: folder with ``<name>/<name>_<4-digit index>.<ext>`` images (aligned crops).
        pairs_file: the LFW ``pairs.txt``.
        train_root: optional folder with one sub-folder per training identity (e.g. CASIA-WebFace).
        image_size: ``(H, W)`` the images are resized to if needed (SphereFace: 112 x 96).
        grayscale: load single-channel images.
        ext: image file extension in ``root``.
        flip_train: random horizontal flips for training.
        batch_size, num_workers: as usual.

    Validation and test both serve the pairs ``(x_a, x_b, is_same, fold)`` (``eval_kinds = ("pairs",)``).
    """

    eval_kinds = ("pairs",)

    def __init__(
        self,
        root: str,
        pairs_file: str,
        train_root: str | None = None,
        image_size: Sequence[int] = (112, 96),
        grayscale: bool = False,
        ext: str = "jpg",
        flip_train: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not os.path.isdir(root):
            raise ValueError(f"root={root!r} is not a directory")
        if not os.path.isfile(pairs_file):
            raise ValueError(f"pairs_file={pairs_file!r} does not exist")
        if train_root is not None and not os.path.isdir(train_root):
            raise ValueError(f"train_root={train_root!r} is not a directory")
        size = tuple(image_size)
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ValueError(f"image_size must be (height, width), got {image_size!r}")
        self.save_hyperparameters()
        self.root, self.pairs_file, self.train_root = root, pairs_file, train_root
        self.image_size = (int(size[0]), int(size[1]))
        self.grayscale, self.ext, self.flip_train = grayscale, ext.lstrip("."), flip_train
        self.batch_size, self.num_workers = batch_size, num_workers
        self.in_channels = 1 if grayscale else 3
        self.pairs_set: _LFWPairs | None = None
        self.train_set: _ImageFolder | None = None
        self.num_classes: int | None = None
        if train_root is not None:
            self.train_set = _ImageFolder(train_root, self.image_size, grayscale, flip_train)
            self.num_classes = len(self.train_set.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.pairs_set is None:
            pairs, folds = read_lfw_pairs(self.pairs_file)
            ds = _LFWPairs(self.root, pairs, folds, self.ext, self.image_size, self.grayscale)
            missing = [p for na, i, nb, j, _ in pairs for p in (ds.path(na, i), ds.path(nb, j))
                       if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} images listed in {self.pairs_file} are missing, e.g. {missing[0]}"
                )
            self.pairs_set = ds

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("LFWPairsDataModule has no training data: pass train_root=<folder of identity folders>")
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=epoch_sampler(self.train_set, True),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.pairs_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
