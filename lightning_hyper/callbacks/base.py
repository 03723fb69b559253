"""The shared machinery of every hyperspherical callback (DESIGN.md, contract 3).

* :class:`LayerSelection` finds the layers whose neurons a callback looks at: layers that own
  neurons (:func:`~lightning_hyper.functional.neurons.has_neurons`: Linear, ConvNd, torch-geometric
  ``Linear``, margin heads), filtered by type names and module-name globs, split into hidden layers
  and the output layer. A pattern that matches nothing is an error.
* :class:`PenaltyCallback` adds ``sum_l penalty_l`` to the training objective. ``mode="loss"`` wraps
  ``pl_module.training_step`` and adds the penalty to the returned loss (so AMP scaling, gradient
  accumulation, DDP and clipping apply to it); ``mode="gradient"`` adds ``d penalty / d params`` to
  ``.grad`` in ``on_before_optimizer_step`` (once per optimizer step, after AMP unscaling, before
  clipping), which also serves manual optimization. Subclasses only define :meth:`layer_terms`.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_hyper.functional.neurons import as_neurons, has_neurons

__all__ = ["LayerRef", "LayerSelection", "PenaltyCallback", "TrainingDivergedError", "default_labels",
           "check_strategy", "destroy_gloo_process_group", "register_gloo_cleanup"]

MODES = ("auto", "loss", "gradient")
NONFINITE_POLICIES = ("error", "skip")
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed")
_SKIP_ATTR = "_lightning_hyper_skip_step"  # global step whose optimizer step a penalty asked to skip


class TrainingDivergedError(FloatingPointError, ValueError):
    """Training diverged: the model's loss, gradients or weights became NaN or Inf.

    Raised by the penalty callbacks and monitors with the global step, where it was found (the loss, a
    layer's gradient, a layer's weights) and what to change; a penalty that is itself the cause raises
    a plain ``FloatingPointError`` naming the penalty instead. A ``ValueError`` too, as the non-finite
    weights error it replaces."""


_DIVERGENCE_FIXES = ("lower the learning rate (lr), clip gradients (Trainer(gradient_clip_val=1.0)), "
                     "ramp the penalty in (MHERegularizer(warmup_steps=...)), or skip such steps "
                     "(on_nonfinite='skip')")


def _first_nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    """Name of the first tensor with a NaN/Inf entry (one host sync when all are finite)."""
    items = [(n, t.detach()) for n, t in named if t is not None]
    if not items:
        return None
    flags = torch.stack([torch.isfinite(t).all() for _, t in items])
    if bool(flags.all()):
        return None
    return items[int((~flags).nonzero()[0])][0]


@dataclass(frozen=True)
class LayerRef:
    """A selected layer: its module name, the module, and its role ``"hidden"`` or ``"output"``."""

    name: str
    module: nn.Module
    role: str

    def neurons(self) -> Tensor:
        """The layer's effective neurons, (N, d) (read at call time: parametrizations apply)."""
        return as_neurons(self.module)


def default_labels(batch: Any) -> Tensor | None:
    """Labels of a batch: ``batch[1]`` of a tuple/list, ``batch.y`` (torch-geometric), ``batch["y"]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("y", "label", "labels", "target"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        return None
    y = getattr(batch, "y", None)
    return y if isinstance(y, Tensor) else None


def check_strategy(trainer: L.Trainer, owner: str) -> None:
    """Raise for sharded strategies whose parameters are not whole on each rank (no-op without a trainer).

    Under a gloo process group it also registers :func:`destroy_gloo_process_group` to run at exit."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    register_gloo_cleanup()
    name = type(strategy).__name__
    if any(tag.lower() in name.lower() for tag in _UNSUPPORTED_STRATEGIES):
        raise RuntimeError(
            f"{owner} does not support strategy {name}: neurons are sharded across ranks there. "
            "Supported strategies: single device ('auto'), 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'"
        )


_GLOO_CLEANUP_REGISTERED = False


def destroy_gloo_process_group() -> None:
    """Destroy the default process group if it is a gloo one.

    Lightning destroys the process group at exit only for nccl. A gloo group left alive until the
    interpreter finalizes tears down its communication threads while they still run, and the worker
    dies with ``terminate called without an active exception`` (SIGABRT) after training finished.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def register_gloo_cleanup() -> None:
    """Run :func:`destroy_gloo_process_group` at interpreter exit (once per process)."""
    global _GLOO_CLEANUP_REGISTERED
    if not _GLOO_CLEANUP_REGISTERED:
        import atexit

        atexit.register(destroy_gloo_process_group)
        _GLOO_CLEANUP_REGISTERED = True


def _as_list(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg}: expected a string or a list of strings, got {value!r}")
    return list(value)


class LayerSelection:
    """Which layers a callback acts on.

    Args:
        include: module-name glob(s) (``fnmatch``, e.g. ``"backbone.*"``) of hidden layers to keep;
            default: every layer with neurons.
        exclude: module-name glob(s) to leave out (hidden or output).
        layer_types: class names of hidden layers to keep (e.g. ``["Conv2d", "Linear"]``).
        output_layer: module name of the output (classifier) layer; default: the module's
            ``output_layer_name`` attribute if it has one, else the last ``Linear``-like layer
            (2-D weight) in ``named_modules()`` order. ``"none"`` means no output layer.
    """

    def __init__(self, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | Sequence[str] | None = None, output_layer: str | None = None) -> None:
        self.include = _as_list(include, "include")
        self.exclude = _as_list(exclude, "exclude")
        self.layer_types = _as_list(layer_types, "layer_types")
        if output_layer is not None and not isinstance(output_layer, str):
            raise TypeError(f"output_layer: expected a module name (str) or None, got {output_layer!r}")
        self.output_layer = output_layer

    def resolve(self, model: nn.Module) -> list[LayerRef]:
        """Select layers of ``model``; raises if a pattern or name matches nothing."""
        candidates = [(n, m) for n, m in model.named_modules() if n and has_neurons(m)]
        if not candidates:
            raise ValueError(f"{type(model).__name__} has no layer with neurons (Linear, ConvNd, "
                             "torch_geometric Linear or a hyperspherical head)")
        names = [n for n, _ in candidates]
        for pattern in self.include + self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                arg = "include" if pattern in self.include else "exclude"
                raise ValueError(f"{arg}: pattern {pattern!r} matches no layer; layers with neurons are: "
                                 f"{_preview(names)}")
        known_types = sorted({type(m).__name__ for _, m in candidates})
        for t in self.layer_types:
            if t not in known_types:
                raise ValueError(f"layer_types: {t!r} matches no layer; types present: {known_types}")
        output_name = self._output_name(model, candidates)
        selected = []
        for name, module in candidates:
            if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                if name != output_name:
                    continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            if self.layer_types and type(module).__name__ not in self.layer_types and name != output_name:
                continue
            selected.append(LayerRef(name, module, "output" if name == output_name else "hidden"))
        return selected

    def _output_name(self, model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str | None:
        names = [n for n, _ in candidates]
        wanted = self.output_layer if self.output_layer is not None else getattr(model, "output_layer_name", None)
        if wanted == "none":
            return None
        if wanted is not None:
            if wanted not in names:
                raise ValueError(f"output_layer: {wanted!r} is not a layer with neurons of "
                                 f"{type(model).__name__}; candidates: {_preview(names)}")
            return wanted
        flat = [n for n, m in candidates if getattr(m, "weight", None) is not None and
                (isinstance(m, nn.Linear) or as_neurons_ndim(m) == 2)]
        return flat[-1] if flat else None


def as_neurons_ndim(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    return w.dim() if isinstance(w, Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) else 2


def _preview(names: Iterable[str], k: int = 12) -> str:
    names = list(names)
    more = f" ... (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


class PenaltyCallback(Callback):
    """Base class: adds ``sum_l penalty_l(layer)`` to the training objective and logs it.

    Subclasses implement :meth:`layer_terms`. Logged (``pl_module.log``, visible in
    ``trainer.callback_metrics`` even with ``logger=False``): ``<prefix>/penalty`` and, per layer,
    ``<prefix>/<key>/<layer name>`` for every key :meth:`layer_terms` returns besides ``"penalty"``.

    Args:
        mode: ``"loss"`` (wrap ``training_step``), ``"gradient"`` (add to ``.grad`` before the
            optimizer step), or ``"auto"`` ("loss" for automatic, "gradient" for manual optimization).
            Under DDP, ``"gradient"`` averages the penalty gradient over the ranks (one all-reduce of
            the selected layers' gradients per step), as DDP does for the loss: a penalty that uses
            each rank's labels would otherwise move the replicas apart.
        labels: ``batch -> labels`` getter for penalties that use the batch's classes
            (default :func:`default_labels`).
        on_nonfinite: ``"error"`` (stop with the layer and step named) or ``"skip"`` (skip that
            optimizer step, with a warning: the penalty is dropped and the gradients of the optimizer's
            parameters are cleared before ``optimizer.step()``, so parameters and optimizer state stay
            unchanged; the step counter advances, as with an AMP overflow. Under DDP the ranks agree:
            a step is skipped on every rank if one rank found a non-finite penalty).
        prefix: metric-name prefix.
        include, exclude, layer_types, output_layer: see :class:`LayerSelection`.
    """

    prefix: str = "penalty"

    def __init__(self, *, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | Sequence[str] | None = None, output_layer: str | None = None,
                 mode: str = "auto", labels: Callable[[Any], Tensor | None] | None = None,
                 on_nonfinite: str = "error", prefix: str | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; accepted values: {list(MODES)}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not supported; accepted values: "
                             f"{list(NONFINITE_POLICIES)}")
        if labels is not None and not callable(labels):
            raise TypeError(f"labels: expected a callable batch -> labels, got {labels!r}")
        self.selection = LayerSelection(include, exclude, layer_types, output_layer)
        self.mode = mode
        self.label_getter = labels or default_labels
        self.on_nonfinite = on_nonfinite
        if prefix is not None:
            self.prefix = prefix
        self.layers: list[LayerRef] = []
        self._active_mode: str | None = None
        self._batch: Any = None
        self._trainer: L.Trainer | None = None
        self._losses_since_step = 0  # batches since the last optimizer step whose training_step returned a loss
        self._names: dict[int, str] | None = None  # id(parameter) -> name, for error messages

    @property
    def state_key(self) -> str:
        # several instances (e.g. two MHERegularizers on different layers) must checkpoint separately
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ subclass API
    def layer_terms(self, layer: LayerRef, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        """Return ``{"penalty": weighted term (with grad), <log key>: value, ...}`` for one layer,
        or ``None`` to skip the layer this step."""
        raise NotImplementedError

    def validate_layers(self, layers: list[LayerRef]) -> None:
        """Hook for subclasses to reject a selection (e.g. no output layer when one is needed)."""

    # ------------------------------------------------------------------ the penalty
    def penalty(self, pl_module: L.LightningModule, batch: Any = None, log: bool = True) -> Tensor:
        """The total penalty for the current weights (and batch labels), with autograd graph.

        Public so that manual-optimization users can also add it to their own loss.
        """
        if not self.layers:
            self.layers = self.selection.resolve(pl_module)
            self.validate_layers(self.layers)
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        labels = self.label_getter(batch) if batch is not None else None
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        bad: tuple[LayerRef, Tensor] | None = None
        device_type = _device_type(pl_module)
        with torch.autocast(device_type=device_type, enabled=False):
            for layer in self.layers:
                try:
                    terms = self.layer_terms(layer, labels, step)
                except ValueError as err:
                    self._raise_if_weights_diverged(step)
                    raise ValueError(f"{type(self).__name__}: layer {layer.name!r} at global step {step}: {err}") from err
                if terms is None:
                    continue
                term = terms.get("penalty")
                if term is not None:
                    if not bool(torch.isfinite(term.detach())):
                        self._raise_if_weights_diverged(step)
                        if self.on_nonfinite == "error":
                            self._nonfinite(layer, term, step)
                        bad = bad or (layer, term)  # "skip": go on, so every DDP rank logs the same keys
                    else:
                        total = term if total is None else total + term
                for key, value in terms.items():
                    if key != "penalty":
                        logs[f"{self.prefix}/{key}/{layer.name}"] = value.detach()
        if bad is not None:
            self._nonfinite(*bad, step=step)
            pl_module.__dict__[_SKIP_ATTR] = step
            total = None
        logged_total = bad[1].detach() if bad is not None else total
        if total is None:
            total = _zero_like_params(pl_module)
        if logged_total is None:
            logged_total = total
        if log and trainer is not None:
            sync = trainer.world_size > 1
            pl_module.log(f"{self.prefix}/penalty", logged_total.detach().float(), on_step=True, on_epoch=False,
                          sync_dist=sync, batch_size=1)
            for key, value in logs.items():
                pl_module.log(key, value.float(), on_step=True, on_epoch=False, sync_dist=sync, batch_size=1)
        return total

    def _nonfinite(self, layer: LayerRef, term: Tensor, step: int) -> None:
        """The penalty itself is NaN/Inf while the weights are finite: blame the penalty."""
        msg = (f"{type(self).__name__}: the penalty of layer {layer.name!r} is {term.item()} at global step "
               f"{step} although its weights are finite (e.g. nearly identical or collapsing neurons)")
        if self.on_nonfinite == "error":
            raise FloatingPointError(msg + "; pass on_nonfinite='skip' to skip such optimizer steps, or lower the "
                                     "penalty's weight / ramp it in with warmup_steps")
        import warnings

        warnings.warn(msg + "; this optimizer step is skipped", RuntimeWarning, stacklevel=2)

    def _raise_if_weights_diverged(self, step: int) -> None:
        """Raise :class:`TrainingDivergedError` if a selected layer's weights are NaN/Inf (the model diverged
        before the penalty saw it: the penalty is not the cause)."""
        bad = _first_nonfinite((layer.name, layer.neurons()) for layer in self.layers)
        if bad is not None:
            raise TrainingDivergedError(
                f"Training diverged before global step {step}: the weights of layer {bad!r} contain NaN or Inf, "
                f"so {type(self).__name__} cannot compute its penalty (it is not the cause: the model's own loss "
                f"or gradients blew up). To fix: {_DIVERGENCE_FIXES}")

    def _check_loss(self, pl_module: L.LightningModule, loss: Any) -> None:
        """A non-finite training loss: raise (``on_nonfinite="error"``) or skip this optimizer step."""
        if not isinstance(loss, Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        if self.on_nonfinite == "error":
            bad = _first_nonfinite((layer.name, layer.neurons()) for layer in self.layers)
            where = f"; the weights of layer {bad!r} are already NaN/Inf" if bad else " while every weight is finite"
            raise TrainingDivergedError(
                f"Training diverged at global step {step}: the loss returned by training_step is "
                f"{float(loss.detach().float().sum())}{where} (the model's own loss, before {type(self).__name__} "
                f"adds its penalty). To fix: {_DIVERGENCE_FIXES}")
        import warnings

        warnings.warn(f"{type(self).__name__}: the training loss is {float(loss.detach().float().sum())} at global "
                      f"step {step}; this optimizer step is skipped", RuntimeWarning, stacklevel=2)
        pl_module.__dict__[_SKIP_ATTR] = step

    def _check_gradients(self, trainer: L.Trainer, params: list[Tensor], from_penalty: Sequence[Tensor | None],
                         names: dict[int, str]) -> bool:
        """True if every gradient about to be applied is finite; else raise (``"error"``) or return False
        (``"skip"``). Under a GradScaler (fp16) non-finite gradients are the scaler's business."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return True
        bad = _first_nonfinite((names.get(id(p), "?"), p.grad) for p in params)
        if bad is None:
            return True
        if self.on_nonfinite == "skip":
            import warnings

            warnings.warn(f"{type(self).__name__}: the gradient of {bad!r} is NaN/Inf at global step "
                          f"{trainer.global_step}; this optimizer step is skipped", RuntimeWarning, stacklevel=2)
            return False
        penalty_bad = _first_nonfinite((names.get(id(p), "?"), g) for p, g in zip(params, from_penalty))
        cause = (f"{type(self).__name__}'s penalty gradient is the cause (nearly identical neurons?): raise its eps, "
                 "lower its weight, or ramp it in with warmup_steps" if penalty_bad is not None else
                 f"the model's own loss gradient is the cause. To fix: {_DIVERGENCE_FIXES}")
        raise TrainingDivergedError(f"Training diverged at global step {trainer.global_step}: the gradient of "
                                    f"parameter {bad!r} contains NaN or Inf; {cause}")

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        self._trainer = trainer
        mode = self.mode
        if mode == "auto":
            mode = "loss" if pl_module.automatic_optimization else "gradient"
        if mode == "loss" and not pl_module.automatic_optimization:
            raise ValueError(f"{type(self).__name__}(mode='loss') needs automatic optimization; the module uses "
                             "manual optimization: use mode='gradient' (or 'auto')")
        self._active_mode = mode
        self.layers = []
        self._losses_since_step = 0
        self._names = None
        pl_module.__dict__.pop(_SKIP_ATTR, None)
        if pl_module.automatic_optimization:
            # "loss": adds the penalty to the returned loss; "gradient": counts the batches that returned a
            # loss, so a window whose training_step returned only None (a skipped batch) gets no penalty either
            _TrainingStepWrapper.attach(pl_module, self, keep=trainer.callbacks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # layers may be created in configure_model, which runs after setup: resolve here
        self.layers = self.selection.resolve(pl_module)
        self.validate_layers(self.layers)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads: Sequence[Tensor | None] = [None] * len(params)
        skipped_batches = pl_module.automatic_optimization and self._losses_since_step == 0
        self._losses_since_step = 0
        if self._active_mode == "gradient" and not skipped_batches:
            with torch.enable_grad():
                total = self.penalty(pl_module, self._batch)
                if total.requires_grad:
                    grads = torch.autograd.grad(total, params, allow_unused=True)
            if trainer.world_size > 1:
                # the penalty may depend on each rank's batch (labels): average its gradient like DDP
                # averages the loss gradient, or the replicas drift apart
                grads = self._mean_over_ranks(trainer, params, grads)
        skip = pl_module.__dict__.get(_SKIP_ATTR) == trainer.global_step
        if self.on_nonfinite == "skip" and trainer.world_size > 1:
            skip = bool(trainer.strategy.reduce_boolean_decision(skip, all=False))  # skipped on one rank: on all
        if not skip:
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))
            skip = not self._check_gradients(trainer, params, grads, self._param_names(pl_module))
        if skip:
            pl_module.__dict__[_SKIP_ATTR] = trainer.global_step
            for p in params:
                p.grad = None

    def _param_names(self, pl_module: L.LightningModule) -> dict[int, str]:
        if self._names is None:
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
        return self._names

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # after a penalized optimizer step every parameter must still be finite
        bad = _first_nonfinite(pl_module.named_parameters())
        if bad is not None:
            raise TrainingDivergedError(
                f"Training diverged at global step {trainer.global_step}: the optimizer step made parameter "
                f"{bad!r} NaN or Inf (its gradient was finite: the step was too large). To fix: {_DIVERGENCE_FIXES}")

    def _mean_over_ranks(self, trainer: L.Trainer, params: list[Tensor],
                         grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Average the penalty gradients of the selected layers' parameters over the DDP ranks
        (one flat all-reduce; the same parameters on every rank, zeros where a rank has no gradient)."""
        owned = {id(p) for layer in self.layers for p in layer.module.parameters()}
        index = [i for i, p in enumerate(params) if id(p) in owned]
        if not index:
            return list(grads)
        parts = [grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in index]
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in parts]), reduce_op="mean")
        out = list(grads)
        offset = 0
        for i, g in zip(index, parts):
            out[i] = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        return out

    def after_training_step(self, pl_module: L.LightningModule, out: Any, batch: Any) -> Tensor | None:
        """Called by the wrapped ``training_step`` with its output (automatic optimization): the penalty
        to add to the loss in ``mode="loss"``, else ``None``. A ``None`` output (a skipped batch) gets none."""
        if out is None:
            return None
        self._losses_since_step += 1
        self._check_loss(pl_module, out.get("loss") if isinstance(out, dict) else out)
        return self.penalty(pl_module, batch) if self._active_mode == "loss" else None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _TrainingStepWrapper.detach(pl_module, self)
            self._batch = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning does not call teardown hooks after an exception: restore training_step here
        _TrainingStepWrapper.detach(pl_module, self)
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _zero_like_params(module: nn.Module) -> Tensor:
    p = next(module.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else "cpu")


class _TrainingStepWrapper:
    """One wrapper per module around ``training_step`` that hands its output to every attached callback
    (:meth:`PenaltyCallback.after_training_step`) and adds the penalties they return to the loss."""

    ATTR = "_lightning_hyper_penalties"

    @classmethod
    def attach(cls, pl_module: L.LightningModule, callback: PenaltyCallback,
               keep: Sequence[Callback] | None = None) -> None:
        callbacks: list[PenaltyCallback] | None = pl_module.__dict__.get(cls.ATTR)
        if callbacks is not None and keep is not None:  # drop callbacks of an earlier, interrupted fit
            callbacks[:] = [cb for cb in callbacks if any(cb is k for k in keep)]
        if callbacks is None:
            original = pl_module.training_step
            callbacks = []

            def training_step(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                batch = args[0] if args else kwargs.get("batch")
                extra = None
                for cb in list(callbacks):
                    term = cb.after_training_step(pl_module, out, batch)
                    if term is not None:
                        extra = term if extra is None else extra + term
                if extra is None:
                    return out
                if isinstance(out, Tensor):
                    return out + extra.to(out.dtype)
                if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
                    return {**out, "loss": out["loss"] + extra.to(out["loss"].dtype)}
                raise TypeError("training_step must return a loss tensor or a dict with 'loss' for a penalty "
                                f"callback in mode='loss', got {type(out).__name__}")

            training_step.__wrapped__ = original  # type: ignore[attr-defined]
            pl_module.__dict__["training_step"] = training_step
            pl_module.__dict__[cls.ATTR] = callbacks
        if callback not in callbacks:
            callbacks.append(callback)

    @classmethod
    def detach(cls, pl_module: L.LightningModule, callback: PenaltyCallback) -> None:
        callbacks = pl_module.__dict__.get(cls.ATTR)
        if callbacks is None:
            return
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            pl_module.__dict__.pop("training_step", None)
            pl_module.__dict__.pop(cls.ATTR, None)


def finite_or_raise(value: float, arg: str, minimum: float | None = None) -> float:
    """Validate a numeric constructor argument."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{arg}={value!r} is not supported; accepted values: a finite number"
                         + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ValueError(f"{arg}={value!r} is not supported; accepted values: a finite number >= {minimum}")
    return float(value)
