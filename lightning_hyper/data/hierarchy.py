"""Hierarchy-aware DataModules for DH2L (spec ``dh2l.md`` §6-7).

Batches are ``(x, y, y_coarse)``: the fine class and its super-class, so both labels travel with
the data (``HypersphericalClassifier`` and the penalty callbacks read ``batch[0]``/``batch[1]`` and
ignore the rest; ``return_coarse=False`` gives plain ``(x, y)``). Every DataModule exposes
``hierarchy`` (the super-class id of each class, a list usable as
``HierarchicalLinear(hierarchy=...)``), ``num_classes`` and ``num_super_classes``.

* :class:`HierarchicalGaussianDataModule` (offline, the default): synthetic Gaussian-mixture
  classes nested in super-classes, a genuine two-level hierarchy by construction.
* :class:`HierarchicalDigitsDataModule` (offline, real data): scikit-learn's 8x8 digits with the ten
  digits grouped into three super-classes by a fixed rule derived from the images
  (:data:`DIGITS_SUPERCLASSES`).
* :class:`CIFAR100HierarchyDataModule`: CIFAR-100 with its 20 super-classes, for users who have the
  data (torchvision layout, nothing downloads by default). The coarse map is a fact of the dataset
  (:data:`CIFAR100_SUPERCLASSES`, from the dataset's documentation) and is checked against the
  ``coarse_labels`` stored in the files.

Importing this module registers the hierarchy names ``"cifar100"`` and ``"digits"``
(``HierarchicalLinear(hierarchy="cifar100")``).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hyper.functional.checks import check_positive_int
from lightning_hyper.data.cifar import CIFAR100DataModule
from lightning_hyper.data.digits import DigitsDataModule
from lightning_hyper.data.sampling import epoch_loader
from lightning_hyper.functional.hierarchy import register_hierarchy

__all__ = [
    "CIFAR100_COARSE_LABELS",
    "CIFAR100_COARSE_LABEL_NAMES",
    "CIFAR100_FINE_LABEL_NAMES",
    "CIFAR100_SUPERCLASSES",
    "CIFAR100HierarchyDataModule",
    "DIGITS_COARSE_LABELS",
    "DIGITS_SUPERCLASSES",
    "HierarchicalDigitsDataModule",
    "HierarchicalGaussianDataModule",
    "WithCoarseLabels",
]

#: CIFAR-100's 20 super-classes and their 5 classes each (names as in the dataset's ``meta`` file)
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: label ids follow the alphabetical order of the names (as in the dataset's ``meta`` file)
CIFAR100_COARSE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(CIFAR100_SUPERCLASSES))
CIFAR100_FINE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(n for v in CIFAR100_SUPERCLASSES.values() for n in v))
#: super-class id of every fine class id (length 100)
CIFAR100_COARSE_LABELS: tuple[int, ...] = tuple(
    CIFAR100_COARSE_LABEL_NAMES.index(next(c for c, members in CIFAR100_SUPERCLASSES.items() if fine in members))
    for fine in CIFAR100_FINE_LABEL_NAMES
)

register_hierarchy("cifar100", list(CIFAR100_COARSE_LABELS))

#: The digits' super-classes (see :class:`HierarchicalDigitsDataModule` for the rule that produced them).
DIGITS_SUPERCLASSES: tuple[tuple[int, ...], ...] = ((0, 3, 5, 9), (1, 2, 7, 8), (4, 6))
#: super-class id of every digit 0..9
DIGITS_COARSE_LABELS: tuple[int, ...] = tuple(
    next(g for g, members in enumerate(DIGITS_SUPERCLASSES) if d in members) for d in range(10)
)

register_hierarchy("digits", list(DIGITS_COARSE_LABELS))


class WithCoarseLabels(Dataset):
    """Wraps a dataset of ``(x, y)`` items into ``(x, y, hierarchy[y])``."""

    def __init__(self, dataset: Dataset, hierarchy: list[int] | tuple[int, ...]) -> None:
        self.dataset = dataset
        self.coarse = torch.as_tensor(list(hierarchy), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, Tensor]:
        x, y = self.dataset[index][:2]
        return x, y, self.coarse[int(y)]


class HierarchicalGaussianDataModule(L.LightningDataModule):
    r"""Offline two-level data: Gaussian-mixture classes nested in Gaussian super-classes.

    With a generator seeded by ``seed``: super-class means :math:`\mu_g \sim N(0, \sigma_s^2 I)`,
    class means :math:`\mu_i = \mu_{g(i)} + N(0, \sigma_c^2 I)` and samples
    :math:`x = \mu_i + N(0, \sigma_n^2 I)`, in ``dim`` dimensions. Class ``i`` belongs to super-class
    ``i // classes_per_super`` (so ``hierarchy = [0]*k + [1]*k + ...``). With
    :math:`\sigma_c < \sigma_s` classes of one super-class are closer to each other than to other
    super-classes: the hierarchy is real, not an arbitrary grouping.

    Args:
        num_super: number of super-classes.
        classes_per_super: classes in each super-class.
        dim: input dimension.
        super_scale, class_scale, noise: :math:`\sigma_s, \sigma_c, \sigma_n`.
        train_per_class, val_per_class: samples per class of the two splits (the held-out split
            serves validation and test).
        batch_size: mini-batch size.
        seed: seed of the means and samples.
        return_coarse: batches ``(x, y, y_coarse)`` (default) or ``(x, y)``.
    """

    def __init__(self, num_super: int = 5, classes_per_super: int = 4, dim: int = 32, super_scale: float = 1.0,
                 class_scale: float = 0.5, noise: float = 1.0, train_per_class: int = 20,
                 val_per_class: int = 100, batch_size: int = 64, seed: int = 0, return_coarse: bool = True) -> None:
        super().__init__()
        for name, v in (("num_super", num_super), ("classes_per_super", classes_per_super), ("dim", dim),
                        ("train_per_class", train_per_class), ("val_per_class", val_per_class)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_super * classes_per_super < 2:
            raise ValueError("need at least two classes (num_super * classes_per_super >= 2)")
        for name, v in (("super_scale", super_scale), ("class_scale", class_scale), ("noise", noise)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        check_positive_int("batch_size", batch_size)
        self.save_hyperparameters()
        self.num_super_classes = num_super
        self.num_classes = num_super * classes_per_super
        self.in_features = dim
        self.hierarchy: list[int] = [i // classes_per_super for i in range(self.num_classes)]
        self.batch_size = batch_size
        self.return_coarse = return_coarse
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def generate(self) -> dict[str, Tensor]:
        """The means and both splits as tensors (deterministic in ``seed``)."""
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed)
        super_means = hp.super_scale * torch.randn(hp.num_super, hp.dim, generator=g)
        parents = torch.tensor(self.hierarchy)
        class_means = super_means[parents] + hp.class_scale * torch.randn(self.num_classes, hp.dim, generator=g)

        def split(per_class: int) -> tuple[Tensor, Tensor]:
            y = torch.arange(self.num_classes).repeat_interleave(per_class)
            x = class_means[y] + hp.noise * torch.randn(len(y), hp.dim, generator=g)
            return x, y

        x_tr, y_tr = split(hp.train_per_class)
        x_va, y_va = split(hp.val_per_class)
        return {"super_means": super_means, "class_means": class_means, "x_train": x_tr, "y_train": y_tr,
                "x_val": x_va, "y_val": y_va}

    def _dataset(self, x: Tensor, y: Tensor) -> TensorDataset:
        if self.return_coarse:
            return TensorDataset(x, y, torch.tensor(self.hierarchy)[y])
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        d = self.generate()
        self.train_set = self._dataset(d["x_train"], d["y_train"])
        self.val_set = self._dataset(d["x_val"], d["y_val"])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return epoch_loader(dataset, batch_size=self.batch_size, shuffle=shuffle, owner=type(self).__name__,
                            seed=self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class HierarchicalDigitsDataModule(DigitsDataModule):
    """scikit-learn's 8x8 digits (offline, real images) with a fixed two-level hierarchy: batches ``(x, y, y_coarse)``.

    The ten digits are grouped into three super-classes, :data:`DIGITS_SUPERCLASSES`::

        super-class 0: digits 0, 3, 5, 9      super-class 1: digits 1, 2, 7, 8      super-class 2: digits 4, 6

    Rule (fixed once, from the data, so the grouping reflects how the images look rather than an
    arbitrary split): Ward agglomerative clustering of the ten class-mean images (all 1797 images,
    pixels / 16) cut at four clusters gives {0}, {3, 5, 9}, {1, 2, 7, 8}, {4, 6}; the singleton {0} is
    merged into the cluster at the smallest mean Euclidean distance from its mean image, {3, 5, 9}, so
    every super-class has at least two digits (as ``HierarchicalLinear(center="mean")`` needs). Digits of
    one super-class are then closer to each other (mean distance between class-mean images 1.83) than to
    the other super-classes' digits (2.16); ``tests/data/test_hierarchy.py`` re-derives both facts.
    ``hierarchy`` (the super-class id of each digit, ``[0, 1, 1, 0, 2, 0, 2, 1, 1, 0]``) is also registered
    as ``HierarchicalLinear(hierarchy="digits")``.

    Args:
        batch_size, val_fraction, seed, flatten, num_workers: as :class:`~lightning_hyper.data.DigitsDataModule`
            (stratified split, pixels in [0, 1]; ``flatten=True`` gives (B, 64) vectors).
        hierarchy: another grouping (super-class id of each digit, 10 integers covering ``0..G-1``);
            default :data:`DIGITS_COARSE_LABELS`.
        return_coarse: batches ``(x, y, y_coarse)`` (default) or ``(x, y)``.

    Attributes: ``hierarchy`` (list), ``num_classes = 10``, ``num_super_classes``, ``in_features`` (64).
    """

    in_features = 64

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.3, seed: int = 0, flatten: bool = False,
                 num_workers: int = 0, hierarchy: list[int] | tuple[int, ...] | None = None,
                 return_coarse: bool = True) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed, flatten=flatten,
                         num_workers=num_workers)
        parents = list(DIGITS_COARSE_LABELS) if hierarchy is None else list(hierarchy)
        if len(parents) != 10 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in parents):
            raise ValueError(f"hierarchy must give the super-class id (an int >= 0) of each of the 10 digits, "
                             f"got {hierarchy!r}")
        missing = sorted(set(range(max(parents) + 1)) - set(parents))
        if missing:
            raise ValueError(f"hierarchy: super-class id(s) {missing} have no digit; ids must cover 0..{max(parents)}")
        self.hierarchy: list[int] = parents
        self.num_super_classes = max(parents) + 1
        self.return_coarse = return_coarse

    def _tensors(self, x: Any, y: Any) -> TensorDataset:
        base = super()._tensors(x, y)
        if not self.return_coarse:
            return base
        xt, yt = base.tensors
        return TensorDataset(xt, yt, torch.tensor(self.hierarchy)[yt])


class CIFAR100HierarchyDataModule(CIFAR100DataModule):
    """CIFAR-100 with its 20 super-classes: batches ``(x, y_fine, y_coarse)``.

    Same arguments, augmentation and splits as
    :class:`~lightning_hyper.data.cifar.CIFAR100DataModule` (``if_missing="synthetic"`` included),
    plus ``return_coarse`` and ``verify_coarse``: in ``setup`` the ``coarse_labels`` (and, if
    present, the label names of ``meta``) stored in ``cifar-100-python/`` are compared with
    :data:`CIFAR100_COARSE_LABELS`; a mismatch raises a ``ValueError`` (the synthetic stand-in has
    no files, so nothing is verified then).
    """

    num_super_classes = 20
    hierarchy: list[int] = list(CIFAR100_COARSE_LABELS)

    def __init__(self, root: str = "data", batch_size: int = 128, download: bool = False, augment: bool = True,
                 val_size: int = 0, seed: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 return_coarse: bool = True, verify_coarse: bool = True, if_missing: str = "error",
                 synthetic_size: int = 1000) -> None:
        super().__init__(root=root, batch_size=batch_size, download=download, augment=augment, val_size=val_size,
                         seed=seed, num_workers=num_workers, pin_memory=pin_memory, if_missing=if_missing,
                         synthetic_size=synthetic_size)
        self.return_coarse = return_coarse
        self.verify_coarse = verify_coarse
        self._verified = False

    def _make(self, train: bool, transform: Any) -> Dataset:
        dataset = super()._make(train, transform)
        if self.verify_coarse and not self._verified and not self.using_synthetic:  # no files to verify
            self._verify()
        return WithCoarseLabels(dataset, self.hierarchy) if self.return_coarse else dataset

    def _verify(self) -> None:
        base = Path(self.root) / self._folder
        meta = base / "meta"
        if meta.exists():
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="latin1")
            for key, expected in (("fine_label_names", CIFAR100_FINE_LABEL_NAMES),
                                  ("coarse_label_names", CIFAR100_COARSE_LABEL_NAMES)):
                if key in names and tuple(names[key]) != expected:
                    raise ValueError(f"{meta}: {key} differ from CIFAR-100's ({list(names[key])[:5]}... vs "
                                     f"{list(expected)[:5]}...); is this CIFAR-100?")
        coarse = torch.tensor(CIFAR100_COARSE_LABELS)
        for split in ("train", "test"):
            with open(base / split, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if "coarse_labels" not in entry:
                continue
            fine = torch.as_tensor(entry["fine_labels"])
            stored = torch.as_tensor(entry["coarse_labels"])
            bad = (coarse[fine] != stored).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"{base / split}: sample {i} has fine label {int(fine[i])} and coarse label "
                                 f"{int(stored[i])}, but CIFAR-100 maps that class to super-class "
                                 f"{int(coarse[fine[i]])} ({bad.numel()} mismatches)")
        self._verified = True
