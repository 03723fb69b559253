"""torch.nn modules (no Lightning imports)."""
from lightning_hyper.nn.registry import HEADS, build_head, register_head
from lightning_hyper.nn.heads import (  # heads.py: the one margin-head family (MarginHead and its presets)
    AngularMarginHead,
    ArcFaceHead,
    ASoftmaxHead,
    CosFaceHead,
    GASoftmaxHead,
    LSoftmaxHead,
    MarginHead,
    ModifiedSoftmaxHead,
    NormFaceHead,
    WSoftmaxHead,
)
from lightning_hyper.nn.sphere import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear, SphereNorm, make_shared_k
from lightning_hyper.nn.decoupled import DecoupledConv1d, DecoupledConv2d, DecoupledConv3d, DecoupledLinear
from lightning_hyper.nn.convert import convert, plan_convert

__all__ = ["HEADS", "build_head", "register_head"]
__all__ += [
    "AngularMarginHead",
    "ArcFaceHead",
    "ASoftmaxHead",
    "CosFaceHead",
    "LSoftmaxHead",
    "MarginHead",
    "ModifiedSoftmaxHead",
    "NormFaceHead",
]
# sphere.py / decoupled.py / convert.py (SphereNet, DCNet); GA-/W-Softmax heads in heads.py
__all__ += [
    "DecoupledConv1d",
    "DecoupledConv2d",
    "DecoupledConv3d",
    "DecoupledLinear",
    "GASoftmaxHead",
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "SphereNorm",
    "WSoftmaxHead",
    "convert",
    "make_shared_k",
    "plan_convert",
]
# hierarchical.py (DH2L)
from lightning_hyper.nn.hierarchical import HierarchicalLinear, Hierarchy, register_hierarchy

__all__ += ["HierarchicalLinear", "Hierarchy", "register_hierarchy"]
# opt.py (OPT); the OGD optimizer lives in lightning_hyper.optim (re-exported here)
from lightning_hyper.nn.opt import apply_opt, remove_opt
from lightning_hyper.optim import StiefelCayleySGD, attach_ogd

__all__ += ["StiefelCayleySGD", "apply_opt", "attach_ogd", "remove_opt"]
# selection.py (the one neuron-selection core, DESIGN.md contract 1)
from lightning_hyper.nn.selection import NeuronGroup, SkippedLayer, explain_selection, select_neurons, selection_table

__all__ += ["NeuronGroup", "SkippedLayer", "explain_selection", "select_neurons", "selection_table"]
