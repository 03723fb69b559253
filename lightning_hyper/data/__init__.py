"""LightningDataModules: offline defaults and loaders for users who have the data."""
from lightning_hyper.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_hyper.data.digits import DigitsDataModule
from lightning_hyper.data.mnist1d import MNIST1DDataModule
from lightning_hyper.data.openset import LFWPairsDataModule, OpenSetDataModule

__all__: list[str] = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
]
__all__ += ["LFWPairsDataModule", "OpenSetDataModule"]
from lightning_hyper.data.hierarchy import CIFAR100HierarchyDataModule, HierarchicalGaussianDataModule  # DH2L

__all__ += ["CIFAR100HierarchyDataModule", "HierarchicalGaussianDataModule"]
