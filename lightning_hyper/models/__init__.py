"""LightningModules and backbones."""
from lightning_hyper.models.backbones import BACKBONES, build_backbone, register_backbone
from lightning_hyper.models.backbones.cnn import CNN1d, PlainCNN
from lightning_hyper.models.backbones.resnet import CifarResNet, ResNet18
from lightning_hyper.models.classifier import HypersphericalClassifier

__all__: list[str] = [
    "BACKBONES",
    "CNN1d",
    "CifarResNet",
    "HypersphericalClassifier",
    "PlainCNN",
    "ResNet18",
    "build_backbone",
    "register_backbone",
]
