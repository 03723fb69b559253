"""LightningDataModules: offline defaults and loaders for users who have the data."""
from lightning_hyper.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_hyper.data.digits import DigitsDataModule
from lightning_hyper.data.mnist1d import MNIST1DDataModule
from lightning_hyper.data.openset import LFWPairsDataModule, OpenSetDataModule
from lightning_hyper.data.hierarchy import (
    CIFAR100HierarchyDataModule,
    HierarchicalDigitsDataModule,
    HierarchicalGaussianDataModule,
)

__all__: list[str] = [
    "CIFAR100DataModule",
    "CIFAR100HierarchyDataModule",
    "HierarchicalDigitsDataModule",
    "HierarchicalGaussianDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
]
__all__ += ["LFWPairsDataModule", "OpenSetDataModule"]
# graphs.py / pointclouds.py (OPT)
from lightning_hyper.data.graphs import (
    KarateClubDataModule,
    PlanetoidDataModule,
    SyntheticGraphDataModule,
)
from lightning_hyper.data.pointclouds import ModelNetDataModule, SyntheticShapesDataModule

__all__ += ["KarateClubDataModule", "ModelNetDataModule", "PlanetoidDataModule", "SyntheticGraphDataModule",
            "SyntheticShapesDataModule"]
# sampling.py (reliability: shuffling that resumed runs reproduce)
from lightning_hyper.data.sampling import EpochShuffleSampler

__all__ += ["EpochShuffleSampler"]
