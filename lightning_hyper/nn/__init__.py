"""torch.nn modules (no Lightning imports)."""
from lightning_hyper.nn.registry import HEADS, build_head, register_head
from lightning_hyper.nn.heads import (
    AngularMarginHead,
    ArcFaceHead,
    ASoftmaxHead,
    CosFaceHead,
    LSoftmaxHead,
    ModifiedSoftmaxHead,
    NormFaceHead,
)

__all__ = ["HEADS", "build_head", "register_head"]
__all__ += [
    "AngularMarginHead",
    "ArcFaceHead",
    "ASoftmaxHead",
    "CosFaceHead",
    "LSoftmaxHead",
    "ModifiedSoftmaxHead",
    "NormFaceHead",
]
