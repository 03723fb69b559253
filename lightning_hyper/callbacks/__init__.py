"""Lightning callbacks: energy regularizers and monitors."""
from lightning_hyper.callbacks.base import PenaltyCallback
from lightning_hyper.callbacks.comhe import CoMHERegularizer
from lightning_hyper.callbacks.dcnet import PretrainedInit, WeightedGradients, WeightProjection
from lightning_hyper.callbacks.mhe import MHERegularizer
from lightning_hyper.callbacks.monitor import EnergyMonitor

__all__ = ["EnergyMonitor", "MHERegularizer", "PenaltyCallback"]
__all__ += ["PretrainedInit", "WeightProjection", "WeightedGradients"]
__all__ += ["CoMHERegularizer"]
from lightning_hyper.callbacks.hierarchical import HierarchicalRegularizer

__all__ += ["HierarchicalRegularizer"]
# orthogonal.py (OPT)
from lightning_hyper.callbacks.orthogonal import OrthogonalityMonitor, OrthogonalRegularizer, SOPTResampler

__all__ += ["OrthogonalRegularizer", "OrthogonalityMonitor", "SOPTResampler"]
# sphere_orthogonality.py (SphereNet / DCNet kernel orthogonality)
from lightning_hyper.callbacks.sphere_orthogonality import SphereOrthogonalityRegularizer

__all__ += ["SphereOrthogonalityRegularizer"]
