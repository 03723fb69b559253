"""One tiny model + callback set per callback family (MHE, CoMHE, hierarchical, orthogonal, DCNet).

Shared by the DDP, resume and non-finite tests of this folder. Every model is a plain
LightningModule (tests/callbacks/helpers.py) of a few hundred parameters; data are 32 seeded
samples in batches of 8 (4 optimizer steps per epoch).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import (
    CoMHEProjection,
    CoMHERegularizer,
    EnergyMonitor,
    HierarchicalRegularizer,
    MHERegularizer,
    OrthogonalityMonitor,
    OrthogonalRegularizer,
    SOPTResampler,
    WeightedGradients,
    WeightProjection,
)
from lightning_hyper.callbacks.base import PenaltyCallback
from lightning_hyper.data.sampling import EpochShuffleSampler
from lightning_hyper.nn import DecoupledLinear, SphereLinear
from lightning_hyper.nn.hierarchical import HierarchicalLinear
from lightning_hyper.nn.opt import apply_opt
from tests.callbacks.helpers import PlainNet

IN, HIDDEN, CLASSES = 12, 16, 6
HIERARCHY = [0, 0, 1, 1, 2, 2]  # super-class of each of the 6 classes
FAMILIES = ["mhe", "comhe", "hierarchical", "orthogonal", "dcnet"]
PENALTY_FAMILIES = ["mhe", "comhe", "hierarchical", "orthogonal"]
# buffers that legitimately differ between DDP ranks after the last step (running statistics of the
# local batch; DDP re-broadcasts them from rank 0 at the next forward)
RUNNING_STATS = ("running_", "num_batches_tracked", "patch_norm_mean")


class HierNet(PlainNet):
    """PlainNet whose classifier is a DH2L ``HierarchicalLinear`` head (3 super-classes x 2 classes)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(in_features=IN, hidden=HIDDEN, classes=CLASSES, **kw)
        self.out = HierarchicalLinear(HIDDEN, hierarchy=HIERARCHY)


class DCNet(PlainNet):
    """Decoupled (tanh x cosine) and Sphere hidden layers, plain classifier."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(in_features=IN, hidden=HIDDEN, classes=CLASSES, **kw)
        self.fc1 = DecoupledLinear(IN, HIDDEN, magnitude="tanh", radius_norm=False)
        self.fc2 = SphereLinear(HIDDEN, HIDDEN, angle_fn="linear")


def loader(n: int = 32, batch_size: int = 8, seed: int = 0, shuffled: bool = False) -> DataLoader:
    """``n`` seeded samples; ``shuffled``: in the order of an ``EpochShuffleSampler`` (as the DataModules)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, sampler=EpochShuffleSampler(ds) if shuffled else None)


def make(family: str, mode: str = "auto", on_nonfinite: str = "error", lr: float = 0.1) -> tuple[nn.Module, list]:
    """``(model, callbacks)`` of a family; the penalty callback (if any) comes first."""
    if family == "mhe":
        model = PlainNet(in_features=IN, hidden=HIDDEN, classes=CLASSES, lr=lr)
        # output_mode="labels": the penalty depends on each rank's batch, so DDP ranks log different values
        cbs = [MHERegularizer(output_mode="labels", neuron_batch_size=8, mode=mode, on_nonfinite=on_nonfinite),
               EnergyMonitor(every_n_steps=1)]
    elif family == "comhe":
        model = PlainNet(in_features=IN, hidden=HIDDEN, classes=CLASSES, lr=lr)
        cbs = [CoMHERegularizer(projection=CoMHEProjection("angle_preserving", projection_dim=4, lr=0.5), seed=3,
                                full_energy_every=1, mode=mode, on_nonfinite=on_nonfinite)]
    elif family == "hierarchical":
        model = HierNet(lr=lr)
        cbs = [HierarchicalRegularizer(weight=1.0, pairs="batch", constraints=["C3"], mode=mode,
                                       on_nonfinite=on_nonfinite)]
    elif family == "orthogonal":
        model = PlainNet(in_features=IN, hidden=HIDDEN, classes=CLASSES, lr=lr)
        apply_opt(model, "relaxed", sopt=True, seed=0)
        cbs = [OrthogonalRegularizer(weight=0.5, mode=mode, on_nonfinite=on_nonfinite),
               SOPTResampler(every_n_steps=2, seed=1), OrthogonalityMonitor(every_n_steps=1)]
    elif family == "dcnet":
        model = DCNet(lr=lr)
        cbs = [WeightProjection(every_n_steps=2, scale=2.0), WeightedGradients()]
    else:
        raise ValueError(family)
    return model, cbs


def penalty_callback(callbacks: list) -> PenaltyCallback | None:
    return next((c for c in callbacks if isinstance(c, PenaltyCallback)), None)


def replica(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that must agree between DDP replicas: parameters and non-running-stat buffers."""
    out = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()
                if not any(tag in k for tag in RUNNING_STATS)})
    return out


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def tensors_of(state: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (callback / optimizer) ``state_dict`` (nested dicts, lists, tensors, numbers) into ``{path: leaf}``."""
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        out: dict[str, Any] = {}
        for k, v in items:
            out.update(tensors_of(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): state}


def assert_same_state(a: Any, b: Any) -> None:
    fa, fb = tensors_of(a), tensors_of(b)
    assert fa.keys() == fb.keys(), (sorted(fa), sorted(fb))
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], (k, fa[k], fb[k])
