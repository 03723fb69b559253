"""Lightning callbacks: energy regularizers and monitors."""
from lightning_hyper.callbacks.base import PenaltyCallback, TrainingDivergedError
from lightning_hyper.callbacks.comhe import CoMHEProjection, CoMHERegularizer
from lightning_hyper.callbacks.dcnet import PretrainedInit, WeightedGradients, WeightProjection
from lightning_hyper.callbacks.hierarchical import HierarchicalRegularizer
from lightning_hyper.callbacks.mhe import MHERegularizer
from lightning_hyper.callbacks.monitor import EnergyMonitor
from lightning_hyper.callbacks.orthogonal import OrthogonalityMonitor, OrthogonalRegularizer, SOPTResampler
from lightning_hyper.callbacks.sphere_orthogonality import SphereOrthogonalityRegularizer

__all__ = [
    "CoMHEProjection",
    "CoMHERegularizer",
    "EnergyMonitor",
    "HierarchicalRegularizer",
    "MHERegularizer",
    "OrthogonalRegularizer",
    "OrthogonalityMonitor",
    "PenaltyCallback",
    "PretrainedInit",
    "SOPTResampler",
    "SphereOrthogonalityRegularizer",
    "TrainingDivergedError",
    "WeightProjection",
    "WeightedGradients",
]
