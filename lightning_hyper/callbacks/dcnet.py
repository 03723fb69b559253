"""DCNet optimization aids (thesis §4.4, App. C.7): weight projection, weighted gradients, pretrained init.

For a *standard* decoupled operator (and SphereConv) the forward depends on a kernel ``w`` only
through ``w / ||w||``, so ``dL/dw = (I - w_hat w_hat^T) dL/dw_hat / ||w||`` (eq. 4.17): orthogonal to
``w`` and scaled by ``1/||w||``. Kernel norms therefore grow under SGD and the effective step shrinks.

* :class:`WeightProjection`: every ``n`` optimizer steps ``w <- s * w / ||w||`` (forward unchanged).
* :class:`WeightedGradients`: replace ``dL/dw`` by ``||w|| dL/dw`` (eq. 4.18; independent of ``||w||``).
* :func:`init_from_cnn` / :class:`PretrainedInit`: copy a trained plain CNN of identical architecture
  into the DCNet (§4.4.3); the decoupled layers subclass ``nn.Conv2d``/``nn.Linear`` so the keys match.

Only standard layers are touched (``DecoupledConv*``/``DecoupledLinear`` with ``weighted="none"``,
``SphereConv*``/``SphereLinear`` with ``angle_fn != "none"``); plain convolutions, shortcuts, BN and
the classifier are left alone. Weighted operators are excluded (their forward depends on ``||w||``).
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Iterable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_hyper.callbacks.base import InstanceStateKey, check_strategy
from lightning_hyper.functional.checks import check_number
from lightning_hyper.nn.decoupled import DecoupledOperator
from lightning_hyper.nn.sphere import SphereOperator

__all__ = [
    "PretrainedInit",
    "WeightProjection",
    "WeightedGradients",
    "init_from_cnn",
    "project_weights",
    "standard_layers",
    "warmup_patch_norms",
]

#: Parameter / buffer names that a DCNet or SphereNet has and a plain CNN does not.
EXTRA_KEYS: tuple[str, ...] = (
    "radius_raw", "k_raw", "patch_norm_mean", "num_batches_tracked", "affine_scale", "affine_shift",
)


def standard_layers(model: nn.Module, include_sphere: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the layers whose forward is invariant to each kernel's norm.

    Decoupled layers with ``weighted="none"``; with ``include_sphere`` also Sphere layers
    (``angle_fn != "none"``).
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, DecoupledOperator) and m.weighted == "none":
            out.append((name, m))
        elif include_sphere and isinstance(m, SphereOperator) and m.angle_fn != "none":
            out.append((name, m))
    return out


def _kernel_norms(weight: Tensor) -> Tensor:
    """Per-kernel L2 norms viewed for broadcasting against ``weight`` (``(C_out, 1, ...)``)."""
    return weight.detach().flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def project_weights(layers: nn.Module | Iterable[nn.Module], scale: float = 1.0, include_sphere: bool = True) -> int:
    """Weight projection (§4.4.1): ``w <- scale * w / ||w||`` for every kernel of every standard layer.

    ``layers``: a model (its standard layers are found with :func:`standard_layers`) or an iterable of
    layers. Zero kernels stay zero. Returns the number of layers projected.
    """
    if isinstance(layers, nn.Module):
        layers = [m for _, m in standard_layers(layers, include_sphere)]
    n = 0
    for m in layers:
        w = m.weight
        w.mul_(scale / _kernel_norms(w).clamp_min(1e-12).to(w.dtype))
        n += 1
    return n


class WeightProjection(InstanceStateKey, Callback):
    """Project the kernels of standard decoupled / Sphere layers onto the sphere of radius ``scale``.

    Fires after the optimizer step that makes ``trainer.global_step`` a multiple of ``every_n_steps``
    (optimizer steps ``n, 2n, ...``, not batches, like every callback's ``every_n_steps``; the reference
    code uses ``n = 100``, ``s = 1``); optimizer state is kept.
    The network's output is unchanged by a projection (up to the layers' ``eps``). Raises in ``setup``
    if the model has no such layer. State (steps and count of projections) under the ``state_key``
    ``"WeightProjection"`` (``"WeightProjection#k"`` for the k-th instance in one Trainer).
    """

    def __init__(self, every_n_steps: int = 100, scale: float = 1.0, include_sphere: bool = True) -> None:
        check_number("every_n_steps", every_n_steps, low=1, low_inclusive=True, integer=True, owner="WeightProjection")
        check_number("scale", scale, low=0, owner="WeightProjection")
        self.every_n_steps = every_n_steps
        self.scale = float(scale)
        self.include_sphere = include_sphere
        self.last_step = -1
        self.num_projections = 0
        self._layers: list[nn.Module] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._assign_state_key(trainer)
        check_strategy(trainer, type(self).__name__)  # per-kernel norms need whole (unsharded) weights
        self._layers = [m for _, m in standard_layers(pl_module, self.include_sphere)]
        if not self._layers:
            raise ValueError(
                "WeightProjection found no standard decoupled/Sphere layer in the model "
                "(DecoupledConv*/DecoupledLinear with weighted='none' or SphereConv*/SphereLinear)"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            project_weights(self._layers, self.scale)
            self.last_step = step
            self.num_projections += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "num_projections": self.num_projections}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))
        self.num_projections = int(state_dict.get("num_projections", 0))


class WeightedGradients(Callback):
    """Weighted gradients (eq. 4.18): ``grad_w <- ||w|| * grad_w`` per kernel of every standard layer.

    Applied in ``on_before_optimizer_step`` (once per optimizer step, after AMP unscaling, before
    gradient clipping), to the full kernel gradient. The resulting update no longer depends on
    ``||w||``. Most visible with SGD (Adam normalizes per-coordinate scales away).
    """

    def __init__(self, include_sphere: bool = True) -> None:
        self.include_sphere = include_sphere
        self._layers: list[nn.Module] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._layers = [m for _, m in standard_layers(pl_module, self.include_sphere)]
        if not self._layers:
            raise ValueError("WeightedGradients found no standard decoupled/Sphere layer in the model")

    @staticmethod
    @torch.no_grad()
    def apply(layers: Iterable[nn.Module]) -> None:
        """Scale ``weight.grad`` of each layer by its per-kernel norm, in place."""
        for m in layers:
            g = m.weight.grad
            if g is not None:
                g.mul_(_kernel_norms(m.weight).to(g.dtype))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.apply(self._layers)


def _load_source(source: nn.Module | Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        obj = torch.load(source, map_location="cpu", weights_only=False)
        return obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"source must be an nn.Module, a state dict or a checkpoint path, got {type(source).__name__}")


def init_from_cnn(
    model: nn.Module,
    source: nn.Module | Mapping[str, Tensor] | str | os.PathLike,
    strict: bool = True,
) -> list[str]:
    """Initialize a DCNet / SphereNet from a trained plain CNN of identical architecture (§4.4.3).

    ``source``: the CNN module, its ``state_dict``, or a path to a ``torch.save``d state dict or a
    Lightning checkpoint (its ``"state_dict"``). Kernels, biases, BN and classifier are copied; the
    radius / curvature parameters keep their fresh values and the patch-norm running means are reset
    (the next training batch re-initializes them). With ``strict``, any key that is missing for another
    reason, unexpected, or shape-mismatched raises a ValueError. Returns the missing (extra) keys.
    """
    state = _load_source(source)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        raise ValueError(f"init_from_cnn: shape mismatch for {mismatched[:5]} (architectures must be identical)")
    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    bad_missing = [k for k in missing if k.rsplit(".", 1)[-1] not in EXTRA_KEYS]
    if strict and (bad_missing or result.unexpected_keys):
        raise ValueError(
            "init_from_cnn: the source does not match the model's architecture; "
            f"missing={bad_missing[:5]}, unexpected={list(result.unexpected_keys)[:5]}"
        )
    for m in model.modules():
        if isinstance(m, DecoupledOperator) and m.radius_norm:
            m.patch_norm_mean.fill_(1.0)
            m.num_batches_tracked.zero_()
    return missing


@torch.no_grad()
def warmup_patch_norms(model: nn.Module, inputs: Iterable[Any], forward: Any = None) -> int:
    """Run ``model`` on ``inputs`` with only the decoupled layers in train mode (BN etc. stay in eval),
    so the running patch-norm means ``E{||x||}`` are set from data without changing anything else.

    ``inputs``: an iterable of model inputs or ``(x, y, ...)`` batches (the first element is used).
    Returns the number of batches run.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, DecoupledOperator):
            m.train()
    n = 0
    try:
        for batch in inputs:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            (forward or model)(x)
            n += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return n


class PretrainedInit(InstanceStateKey, Callback):
    """Lightning wrapper of :func:`init_from_cnn` (+ optional :func:`warmup_patch_norms`).

    Args:
        source: trained plain CNN (module, state dict or checkpoint path of the same LightningModule
            class with ``operator="conv"``).
        submodule: dotted name of the part of the LightningModule to load into (``""`` = whole module,
            e.g. ``"backbone"`` with a backbone's state dict).
        warmup_batches: number of training batches run (no optimizer step, BN frozen) at the start of
            training to set the decoupled layers' running patch-norm means.

    The weights are copied in ``setup("fit")`` (before a checkpoint restore, which then wins); warm-up
    runs once in ``on_train_start`` and is recorded in the callback state (``state_key``
    ``"PretrainedInit"``, ``"PretrainedInit#k"`` for the k-th instance), so a resumed run skips it.
    """

    def __init__(self, source: Any, submodule: str = "", warmup_batches: int = 0, strict: bool = True) -> None:
        check_number("warmup_batches", warmup_batches, low=0, low_inclusive=True, integer=True, owner="PretrainedInit")
        self.source = source
        self.submodule = submodule
        self.warmup_batches = warmup_batches
        self.strict = strict
        self.done = False

    def _target(self, pl_module: nn.Module) -> nn.Module:
        if not self.submodule:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError as err:
            raise ValueError(f"submodule={self.submodule!r} is not a submodule of {type(pl_module).__name__}") from err

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._assign_state_key(trainer)
        if stage == "fit" and not self.done:
            init_from_cnn(self._target(pl_module), self.source, self.strict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done:
            return
        if self.warmup_batches:
            loader = trainer.train_dataloader

            def batches():
                for i, batch in enumerate(loader):
                    if i >= self.warmup_batches:
                        return
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    yield x.to(pl_module.device)

            warmup_patch_norms(pl_module, batches())
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
