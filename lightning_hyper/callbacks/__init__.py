"""Lightning callbacks: energy regularizers and monitors."""
from lightning_hyper.callbacks.base import PenaltyCallback
from lightning_hyper.callbacks.comhe import CoMHERegularizer
from lightning_hyper.callbacks.mhe import MHERegularizer
from lightning_hyper.callbacks.monitor import EnergyMonitor

__all__ = ["CoMHERegularizer", "EnergyMonitor", "MHERegularizer", "PenaltyCallback"]
from lightning_hyper.callbacks.dcnet import PretrainedInit, WeightedGradients, WeightProjection

__all__ += ["PretrainedInit", "WeightProjection", "WeightedGradients"]
from lightning_hyper.callbacks.hierarchical import HierarchicalRegularizer  # DH2L

__all__ += ["HierarchicalRegularizer"]
