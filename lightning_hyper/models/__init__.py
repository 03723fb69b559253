"""LightningModules and backbones."""
from lightning_hyper.models.backbones import BACKBONES, build_backbone, register_backbone
from lightning_hyper.models.backbones.cnn import CNN1d, PlainCNN
from lightning_hyper.models.backbones.resnet import CifarResNet, ResNet18
from lightning_hyper.models.classifier import HypersphericalClassifier
from lightning_hyper.models.backbones.sphereface import EmbeddingMLP, LSoftmaxCNN, SphereFaceNet
from lightning_hyper.models.sphereface import SphereFaceModule, TrainingDivergedError

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
__all__ += ["EmbeddingMLP", "LSoftmaxCNN", "SphereFaceModule", "SphereFaceNet", "TrainingDivergedError"]
# OPT: graph / point-cloud / CNN classifiers
from lightning_hyper.models.backbones.gcn import GCN
from lightning_hyper.models.backbones.pointnet import PointNet, PointNet2
from lightning_hyper.models.graph import GraphClassifier
from lightning_hyper.models.opt import OPTClassifier
from lightning_hyper.models.pointcloud import PointCloudClassifier

__all__ += ["GCN", "GraphClassifier", "OPTClassifier", "PointCloudClassifier", "PointNet", "PointNet2"]
