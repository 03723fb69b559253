"""LightningDataModules: offline defaults and loaders for users who have the data."""
from lightning_hyper.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_hyper.data.digits import DigitsDataModule
from lightning_hyper.data.mnist1d import MNIST1DDataModule

__all__: list[str] = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
]
