"""The shared machinery of every hyperspherical callback (DESIGN.md, contract 3).

* :class:`NeuronCallback` (base of :class:`PenaltyCallback` and ``EnergyMonitor``) selects the neuron
  groups a callback reads with :func:`lightning_hyper.nn.select_neurons` (``include`` / ``exclude`` /
  ``layer_types`` / ``output_layer``). The groups are resolved once per fit, on the first training
  batch: the model is run once on that batch's inputs (``inputs=`` getter) so lazy layers exist and the
  output layer is the last neuron layer the forward pass executes. What was selected and skipped is
  printed once, on rank zero (``verbose=True``). It also gives each instance its own checkpoint
  ``state_key`` and warns when a checkpoint holds no state for it.
* :class:`PenaltyCallback` adds ``sum_l penalty_l`` to the training objective. ``mode="loss"`` wraps
  ``pl_module.training_step`` and adds the penalty to the returned loss (so AMP scaling, gradient
  accumulation, DDP and clipping apply to it); ``mode="gradient"`` adds ``d penalty / d params`` to
  ``.grad`` in ``on_before_optimizer_step`` (once per optimizer step, after AMP unscaling, before
  clipping), which also serves manual optimization. Subclasses only define :meth:`layer_terms` and read
  neurons through :meth:`PenaltyCallback.neurons`, which applies the safeguards (bounded gradient,
  zero-norm rows).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.callbacks.strategies import SUPPORTED_STRATEGIES, unsupported_strategy
from lightning_hyper.functional.distributed import all_finite, bound_sharded_gradient_norm, is_dtensor, use_ring
from lightning_hyper.functional.safeguards import bound_gradient_norm
from lightning_hyper.nn.selection import NeuronGroup, SkippedLayer, check_patterns, select_neurons, selection_table

__all__ = ["NeuronCallback", "NeuronSelection", "PenaltyCallback", "TrainingDivergedError", "default_inputs",
           "default_labels", "check_strategy", "destroy_gloo_process_group", "register_gloo_cleanup"]

MODES = ("auto", "loss", "gradient")
NONFINITE_POLICIES = ("error", "skip")
ZERO_NORM_POLICIES = ("warn", "exclude", "error")
#: rows of a smaller norm have no direction (the energy core's ``min_norm``)
MIN_NORM = 1e-6
#: default ``max_grad_norm`` of the penalty callbacks: the largest Frobenius norm of one group's penalty
#: gradient (w.r.t. its neurons) per optimizer step. Largest norms measured in normal training
#: (benchmarks/penalty_grad_norms.py): digits CNN-9 0.34 (MHE) / 1.8 (CoMHE), tiny ViT 1.6 (MHE) / 2.4
#: (CoMHE); ~10x the largest, so it does not bind there. Nearly identical rows of a zero-initialized
#: ViT head reach 7.5e6 without it.
DEFAULT_MAX_GRAD_NORM = 25.0
#: module -> the global step whose optimizer step a penalty asked to skip (shared by every penalty callback
#: of that module; kept here, not on the user's module)
_SKIPPED_STEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    if any(is_dtensor(t) for _, t in items):  # FSDP2: each rank checks its shards, the ranks agree (all-reduce)
        flags = all_finite([t for _, t in items])
        return next((n for (n, _), ok in zip(items, flags) if not ok), None)
    flags = torch.stack([torch.isfinite(t).all() for _, t in items])
    if bool(flags.all()):
        return None
    return items[int((~flags).nonzero()[0])][0]


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


_INPUT_KEYS = ("x", "input", "inputs", "input_ids", "image", "images")


def default_inputs(batch: Any) -> Any:
    """The model input of a batch, to run ``pl_module(input)`` once when the groups are resolved.

    ``batch[0]`` of a tuple/list; ``batch["x"]`` (or ``"input"``, ``"inputs"``, ``"input_ids"``,
    ``"image"``, ``"images"``) of a dict; ``(batch.x, batch.edge_index)`` of a torch-geometric
    ``Data``/``Batch`` (passed as two positional arguments, as ``GraphClassifier`` and torch-geometric's
    GNN models are called); a tensor as it is; else ``None`` (no forward pass).
    A tuple is passed as positional arguments, a dict as keyword arguments.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else None
    if isinstance(batch, dict):
        return next((batch[k] for k in _INPUT_KEYS if k in batch), None)
    x, edge_index = getattr(batch, "x", None), getattr(batch, "edge_index", None)
    if isinstance(x, Tensor) and isinstance(edge_index, Tensor):
        return (x, edge_index)
    return None


def check_strategy(trainer: L.Trainer, owner: str) -> None:
    """Raise for sharded strategies whose parameters are not whole on each rank (no-op without a trainer).

    Under a gloo process group it also registers :func:`destroy_gloo_process_group` to run at exit."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    register_gloo_cleanup()
    reason = unsupported_strategy(strategy)  # isinstance checks (callbacks/strategies.py)
    if reason is not None:
        raise RuntimeError(f"{owner} does not support strategy {type(strategy).__name__}: {reason}. "
                           f"Supported strategies: {SUPPORTED_STRATEGIES}")


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


class NeuronSelection:
    """The selection arguments of a callback, resolved with :func:`~lightning_hyper.nn.select_neurons`.

    Args:
        include: glob(s) (``fnmatch``) of group or module names to keep (every group, the output layer
            included); default: every group.
        exclude: glob(s) of groups to leave out.
        layer_types: class names (or ``nn.Module`` subclasses) to keep, base classes included.
        output_layer: name of the output layer, or ``"none"``; default: the model's ``output_layer_name``,
            else the last neuron layer of the forward pass on the first training batch.
    """

    def __init__(self, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None,
                 output_layer: str | None = None) -> None:
        check_patterns(include, "include")  # type errors now, not at the first batch
        check_patterns(exclude, "exclude")
        check_patterns(layer_types, "layer_types", allow_types=True)
        if output_layer is not None and not isinstance(output_layer, str):
            raise TypeError(f"output_layer={output_layer!r} is not supported: expected a layer name (str), 'none' "
                            "or None (detect it)")
        self.include, self.exclude, self.layer_types, self.output_layer = include, exclude, layer_types, output_layer

    def kwargs(self) -> dict[str, Any]:
        return dict(include=self.include, exclude=self.exclude, layer_types=self.layer_types,
                    output_layer=self.output_layer)

    def resolve(self, model: nn.Module, example_input: Any = None, return_skipped: bool = False
                ) -> list[NeuronGroup] | tuple[list[NeuronGroup], list[SkippedLayer]]:
        """``select_neurons(model, ...)`` with these arguments (see there)."""
        return select_neurons(model, example_input=example_input, return_skipped=return_skipped, **self.kwargs())


class LayerSelection(NeuronSelection):
    """Deprecated alias of :class:`NeuronSelection` (``resolve`` returns :class:`NeuronGroup` objects)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("LayerSelection is deprecated: use lightning_hyper.nn.select_neurons(model, include=..., "
                      "exclude=..., layer_types=..., output_layer=...) (or NeuronSelection)", DeprecationWarning,
                      stacklevel=2)
        super().__init__(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LayerRef":
        warnings.warn("LayerRef is deprecated: selected layers are lightning_hyper.nn.NeuronGroup objects",
                      DeprecationWarning, stacklevel=2)
        return NeuronGroup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InstanceStateKey:
    """Mixin: distinct checkpoint ``state_key`` for several instances of one callback class in a Trainer.

    The key is the class name plus :meth:`_state_key_fields` (e.g. ``MHERegularizer{'prefix': 'mhe'}``, as
    before). When a Trainer holds several instances with the same key, ``setup`` numbers them in the
    order of ``trainer.callbacks``: the first keeps the key, the k-th gets ``...#k``, so each is saved
    and restored separately (and a resumed run, built in the same order, finds its own state). Before
    ``setup`` the key carries the instance's id, so Lightning's check of duplicate keys at
    ``Trainer(...)`` passes. A checkpoint that holds no state for this instance gives a warning on load.
    """

    _state_ordinal: int | None = None

    def _state_key_fields(self) -> dict[str, Any] | None:
        return None

    def _base_state_key(self) -> str:
        fields = self._state_key_fields()
        return self._generate_state_key(**fields) if fields else type(self).__qualname__  # type: ignore[attr-defined]

    @property
    def state_key(self) -> str:
        base = self._base_state_key()
        ordinal = self._state_ordinal
        if ordinal is None:
            return f"{base}#unassigned-{id(self):x}"
        return base if ordinal == 0 else f"{base}#{ordinal + 1}"

    def _assign_state_key(self, trainer: Any) -> None:
        callbacks = list(getattr(trainer, "callbacks", None) or [self])
        base = self._base_state_key()
        same = [cb for cb in callbacks if type(cb) is type(self) and cb._base_state_key() == base]
        self._state_ordinal = next((i for i, cb in enumerate(same) if cb is self), 0)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if not self.state_dict() or self.state_key in states:  # type: ignore[attr-defined]
            return  # nothing to restore (a stateless callback saves nothing), or Lightning restores it
        rank_zero_warn(f"{type(self).__name__}: the checkpoint holds no state for this callback (state key "
                       f"{self.state_key!r}; callback keys in the checkpoint: {sorted(map(str, states))}); it starts "
                       "from fresh state. (Was it added after the checkpoint was written, or configured "
                       "differently, e.g. another prefix?)", category=UserWarning)


@contextlib.contextmanager
def _example_forward_context(trainer: Any, module: nn.Module):
    """Around the selection's forward pass: the global RNGs are restored afterwards (the extra forward
    pass changes no random draw of training), ``torch.compile``d code runs eagerly (no recompilation for
    the hooks), and the precision plugin's context (autocast, default dtype) applies."""
    with contextlib.ExitStack() as stack:
        devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
        stack.enter_context(torch.random.fork_rng(devices=devices))
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is not None and hasattr(plugin, "forward_context"):
            stack.enter_context(plugin.forward_context())
        yield


class NeuronCallback(InstanceStateKey, Callback):
    """Base of the callbacks that read a model's neurons (penalties and ``EnergyMonitor``).

    Args:
        include, exclude, layer_types, output_layer: the selection (:class:`NeuronSelection`,
            :func:`~lightning_hyper.nn.select_neurons`).
        inputs: ``batch -> model input`` getter for the forward pass that resolves the groups on the
            first training batch (default :func:`default_inputs`). The pass runs only when the output
            layer is not named (``output_layer=`` or the model's ``output_layer_name``) or the model has
            lazy layers; if it fails, the static rule (last Linear-like layer) is used, with one warning.
        verbose: print the selection table once per fit, on rank zero.
    """

    prefix: str = "neurons"

    def _init_selection(self, include: Any, exclude: Any, layer_types: Any, output_layer: Any,
                        inputs: Callable[[Any], Any] | None, verbose: bool) -> None:
        self.selection = NeuronSelection(include, exclude, layer_types, output_layer)
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs={inputs!r} is not supported: expected a callable batch -> model input "
                            "(a tensor, a tuple of positional arguments or a dict of keyword arguments), or None")
        if not isinstance(verbose, bool):
            raise TypeError(f"verbose={verbose!r} is not supported: expected True or False")
        self.input_getter = inputs or default_inputs
        self.verbose = verbose
        self.layers: list[NeuronGroup] = []
        self.skipped: list[SkippedLayer] = []
        self._resolved = False

    def _state_key_fields(self) -> dict[str, Any] | None:
        return {"prefix": self.prefix}

    @property
    def log_prefix(self) -> str:
        """The metric-name prefix: ``prefix``, or ``prefix_<k>`` for the k-th instance of this class with
        the same prefix in one Trainer (so their metrics do not overwrite each other)."""
        ordinal = self._state_ordinal or 0
        return self.prefix if ordinal == 0 else f"{self.prefix}_{ordinal + 1}"

    # ------------------------------------------------------------------ resolution
    def validate_layers(self, layers: list[NeuronGroup]) -> None:
        """Hook for subclasses to reject a selection (e.g. no output layer when one is needed)."""

    def resolve(self, pl_module: nn.Module, batch: Any = None, trainer: Any = None) -> list[NeuronGroup]:
        """Select the groups of ``pl_module`` (running it on ``inputs(batch)`` when needed), keep them in
        :attr:`layers` / :attr:`skipped` and validate them. Called on the first training batch."""
        how, example = self._output_source(pl_module), None
        if batch is not None and (how is None or _has_lazy(pl_module)):
            example = self.input_getter(batch)
        result = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if example is not None:
                try:
                    with _example_forward_context(trainer, pl_module):
                        result = self.selection.resolve(pl_module, example_input=example, return_skipped=True)
                    how = how or "the last neuron layer of the forward pass on the first training batch"
                except RuntimeError as err:
                    if not str(err).startswith("example_input"):
                        raise
                    cause = err.__cause__ if err.__cause__ is not None else err
                    rank_zero_warn(
                        f"{type(self).__name__}: running {type(pl_module).__name__} on the first training batch to "
                        f"find its output layer failed ({type(cause).__name__}: {cause}); the output layer is the "
                        "last Linear-like layer in named_modules() order instead. Fix: pass output_layer='<name>' "
                        f"(or set {type(pl_module).__name__}.output_layer_name), or inputs=<batch -> model input>",
                        category=UserWarning)
            if result is None:
                result = self.selection.resolve(pl_module, return_skipped=True)
                how = how or "the last Linear-like layer in named_modules() order (no forward pass)"
        _reemit(caught, trainer)
        groups, skipped = result
        if not groups:
            raise ValueError(f"{type(self).__name__} selected no layer with neurons in {type(pl_module).__name__} "
                             f"({self._args_text()}). What was found:\n{selection_table(groups, skipped)}")
        self.validate_layers(groups)
        self.layers, self.skipped, self._resolved = groups, skipped, True
        self._output_how = how
        if self.verbose and (trainer is None or getattr(trainer, "is_global_zero", True)):
            # a progress bar is drawing its line at the first batch: start the table on a line of its own
            bar = getattr(trainer, "progress_bar_callback", None) is not None
            rank_zero_info(("\n" if bar else "") + self.selection_report())
        return groups

    def _output_source(self, pl_module: nn.Module) -> str | None:
        if self.selection.output_layer is not None:
            return f"output_layer={self.selection.output_layer!r}"
        if getattr(pl_module, "output_layer_name", None) is not None:
            return f"{type(pl_module).__name__}.output_layer_name"
        return None

    def _args_text(self) -> str:
        args = {k: v for k, v in self.selection.kwargs().items() if v is not None}
        return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "default selection"

    def selection_report(self) -> str:
        """The text printed at the start of fit: a header, then :func:`selection_table`."""
        outputs = [g.name for g in self.layers if g.role == "output"]
        out = f"output layer {', '.join(repr(n) for n in outputs)}" if outputs else "no output layer"
        how = getattr(self, "_output_how", None)
        prefix = f", logs under '{self.log_prefix}/'" if self.log_prefix != self.prefix else ""
        head = (f"{type(self).__name__}{prefix}: {len(self.layers)} neuron group(s), {out}"
                + (f" (from {how})" if how and outputs else "") + f"; {self._args_text()}")
        return head + "\n" + selection_table(self.layers, self.skipped)

    def _precheck(self, pl_module: nn.Module) -> None:
        """Argument errors (a pattern or name that matches nothing) before training starts."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.selection.resolve(pl_module)

    def _start_fit(self, trainer: Any, pl_module: nn.Module) -> None:
        self.layers, self.skipped, self._resolved = [], [], False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._resolved:
            self.resolve(pl_module, batch, trainer)


#: trainer -> the selection warnings already given in its fit (kept here, not on the Trainer object)
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reemit(caught: list[warnings.WarningMessage], trainer: Any) -> None:
    """Re-issue the warnings caught while resolving: the selection core's own (e.g. a weight it cannot read)
    once per Trainer and on rank zero only, however many callbacks resolve their groups; others as they were."""
    seen = _WARNED.setdefault(trainer, set()) if trainer is not None else set()
    for w in caught:
        text = str(w.message)
        if text.startswith("select_neurons:"):
            if text not in seen:
                seen.add(text)
                rank_zero_warn(text, category=w.category)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _has_lazy(module: nn.Module) -> bool:
    return any(is_lazy(p) for p in module.parameters())


def finite_or_raise(value: float, arg: str, minimum: float | None = None) -> float:
    """Validate a numeric constructor argument: a finite number (``>= minimum`` if given), as a float
    (:func:`~lightning_hyper.functional.checks.check_number`, the one message style)."""
    return check_number(arg, value, low=minimum, low_inclusive=True)


def renamed_argument(owner: str, old: str, new: str, value: Any, stacklevel: int = 3) -> None:
    """Warn that ``owner(old=...)`` is the deprecated name of ``new`` (kept for one release)."""
    warnings.warn(f"{owner}({old}={value!r}) is deprecated; use {new}. The old name will be removed in a future "
                  "release.", DeprecationWarning, stacklevel=stacklevel)


def step_in_schedule(previous: int, current: int, every_n_steps: int) -> bool:
    """Whether an optimizer step of index ``t`` with ``t % every_n_steps == 0`` ran between two readings of
    ``trainer.global_step`` (``previous`` < ``current``): the callbacks' ``every_n_steps`` counts optimizer
    steps, so under gradient accumulation a period of ``n`` steps spans ``n * accumulate_grad_batches`` batches.

    >>> [g for g in range(1, 8) if step_in_schedule(g - 1, g, 3)]  # after steps 0, 3, 6 (global_step 1, 4, 7)
    [1, 4, 7]
    """
    return current > previous and (current - 1) // every_n_steps != (previous - 1) // every_n_steps


def logger_writes_this_batch(trainer: L.Trainer, stepped: bool, batches: int) -> bool:
    """Whether Lightning writes this training batch's on-step metrics to the loggers (public trainer state only).

    Lightning writes after a batch that stepped the optimizer (automatic optimization; every batch in manual
    optimization) whose count of such batches is a multiple of ``log_every_n_steps``, and when the trainer
    should stop. ``stepped``: this batch ran an optimizer step; ``batches``: the count of stepping batches so
    far, this one included (``trainer.global_step`` under automatic optimization).
    """
    if not trainer.loggers or not trainer.log_every_n_steps:
        return False
    if trainer.should_stop:
        return True
    return stepped and batches % trainer.log_every_n_steps == 0


class PenaltyCallback(NeuronCallback):
    """Base class: adds ``sum_l penalty_l(layer)`` to the training objective and logs it.

    Subclasses implement :meth:`layer_terms` and read a group's neurons with :meth:`neurons`. Logged
    (``pl_module.log``, visible in ``trainer.callback_metrics`` even with ``logger=False``):
    ``<prefix>/penalty`` and, per group, ``<prefix>/<key>/<group name>`` for every key :meth:`layer_terms`
    returns besides ``"penalty"``.

    Grouped neurons: a grouped convolution's neurons are ``(G, N/G, d)`` (one sphere per channel group);
    the penalties compute every group's term in one batched call and a layer's term is the **mean over
    its groups**.

    Args:
        include, exclude, layer_types, output_layer: which neuron groups (:func:`~lightning_hyper.nn.select_neurons`);
            resolved on the first training batch, printed once (see :class:`NeuronCallback`).
        inputs: ``batch -> model input`` for that first-batch forward pass (default :func:`default_inputs`).
        verbose: print the selection table at the start of fit (rank zero).
        mode: ``"loss"`` (wrap ``training_step``), ``"gradient"`` (add to ``.grad`` before the
            optimizer step), or ``"auto"`` ("loss" for automatic, "gradient" for manual optimization).
            Under DDP, ``"gradient"`` averages the penalty gradient over the ranks (one all-reduce of
            the selected groups' leaf parameters' gradients per step), as DDP does for the loss: a penalty
            that uses each rank's labels would otherwise move the replicas apart.
        labels: ``batch -> labels`` getter for penalties that use the batch's classes
            (default :func:`default_labels`).
        on_nonfinite: ``"error"`` (stop with the layer and step named) or ``"skip"`` (skip that
            optimizer step, with a warning: the penalty is dropped and the gradients of the optimizer's
            parameters are cleared before ``optimizer.step()``, so parameters and optimizer state stay
            unchanged; the step counter advances, as with an AMP overflow. Under DDP the ranks agree:
            a step is skipped on every rank if one rank found a non-finite penalty).
        max_grad_norm: safeguard: the Frobenius norm of one group's penalty gradient (w.r.t. its neurons,
            per optimizer step) is scaled down to at most this value (:func:`~lightning_hyper.functional.
            safeguards.bound_gradient_norm`), so nearly identical neurons cannot send a huge step into the
            weights. The default (:data:`DEFAULT_MAX_GRAD_NORM` = 25) is ~10x the largest norm measured in
            normal training (``benchmarks/penalty_grad_norms.py``); ``None`` disables it. Applies to what
            subclasses read through :meth:`neurons`.
        prefix: metric-name prefix.
        every_n_steps: compute the penalty only on the optimizer steps whose index (``trainer.global_step``
            when the step's batches run) is a multiple of ``k = every_n_steps``, and multiply it by ``k`` there,
            so the time-averaged strength is unchanged and the penalty costs ``1/k`` of its time (default 1:
            every step). Steps count optimizer steps, not batches: under gradient accumulation
            (``accumulate_grad_batches=A``) ``mode="loss"`` adds ``k * penalty`` to every one of the ``A``
            micro-batch losses of a chosen step (Lightning divides each by ``A``), so that step's penalty
            gradient is ``k`` times the every-step one and the mean over ``k`` steps equals it;
            ``mode="gradient"`` adds ``k * d penalty / d params`` once, before the chosen optimizer step. The
            ``max_grad_norm`` bound applies to the unscaled gradient. ``<prefix>/penalty`` and the per-layer
            values are logged (unscaled) only on the steps where the penalty is computed.
    """

    prefix: str = "penalty"
    #: zero-norm policy of penalties that normalize neurons (``None``: the penalty does not normalize)
    zero_norm: str | None = None

    def __init__(self, *, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True, mode: str = "auto",
                 labels: Callable[[Any], Tensor | None] | None = None, on_nonfinite: str = "error",
                 max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM, prefix: str | None = None,
                 every_n_steps: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        check_choice("mode", mode, MODES, owner=owner)
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES, owner=owner)
        if labels is not None and not callable(labels):
            raise TypeError(f"{owner}: labels={labels!r} is not supported; accepted values: a callable batch -> "
                            "labels, or None (default_labels)")
        check_number("max_grad_norm", max_grad_norm, low=0, allow_none=True, owner=owner,
                     fix=f"the default is {DEFAULT_MAX_GRAD_NORM}; None disables the bound")
        self.every_n_steps = check_number("every_n_steps", every_n_steps, low=1, low_inclusive=True, integer=True,
                                          owner=owner)
        if prefix is not None:
            self.prefix = prefix
        self._init_selection(include, exclude, layer_types, output_layer, inputs, verbose)
        self.mode = mode
        self.label_getter = labels or default_labels
        self.on_nonfinite = on_nonfinite
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._active_mode: str | None = None
        self._batch: Any = None
        self._trainer: L.Trainer | None = None
        self._losses_since_step = 0  # batches since the last optimizer step whose training_step returned a loss
        self._names: dict[int, str] | None = None  # id(parameter) -> name, for error messages
        self._cache: dict[str, Tensor] | None = None  # group name -> neurons, during one penalty() call
        self._limit: float | None = None  # max_grad_norm in the units of the gradient that will arrive
        self._directions: dict[str, int] = {}  # group name -> rows with a direction (zero-norm policies)
        self._warned_zero_norm = False

    def due(self, step: int) -> bool:
        """Whether the penalty is computed for the optimizer step of index ``step`` (``every_n_steps``)."""
        return step % self.every_n_steps == 0

    # ------------------------------------------------------------------ subclass API
    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        """Return ``{"penalty": weighted term (with grad), <log key>: value, ...}`` for one group,
        or ``None`` to skip the group this step."""
        raise NotImplementedError

    def neurons(self, group: NeuronGroup) -> Tensor:
        """The group's effective neurons, ``(N, d)`` or ``(G, N/G, d)``, read now, with the gradient
        bound of ``max_grad_norm`` attached (within one :meth:`penalty` call: computed once per group)."""
        cache = self._cache
        if cache is not None and group.name in cache:
            return cache[group.name]
        n = group.neurons()
        limit = self._limit if cache is not None else self.max_grad_norm
        if limit is not None and n.requires_grad and torch.is_grad_enabled():
            n = bound_gradient_norm(n, limit)
        if cache is not None:
            cache[group.name] = n
        return n

    #: how the energy of a sharded (FSDP2 ``DTensor``) layer is computed: ``"gather"`` (its full weight on every
    #: rank), ``"ring"`` (row blocks passed around the ranks) or ``"auto"``; callbacks with an energy take it as
    #: the ``sharded_energy`` argument (functional/distributed.py)
    sharded_energy: str = "gather"

    def ring_neurons(self, group: NeuronGroup) -> tuple[Tensor, Any] | None:
        """``(this rank's neuron rows, process group)`` if ``group``'s energy is computed on the ring (a
        row-sharded weight and ``sharded_energy`` "ring", or "auto" for a large layer), else ``None``. The
        rows carry the ``max_grad_norm`` bound of the whole layer's gradient."""
        if self.sharded_energy == "gather":
            return None
        if not use_ring(getattr(group.module, group.parameter_name), self.sharded_energy):
            return None
        local = group.local_neurons()
        if local is None:
            return None
        rows, pg = local
        limit = self._limit if self._cache is not None else self.max_grad_norm
        if limit is not None and rows.requires_grad and torch.is_grad_enabled():
            rows = bound_sharded_gradient_norm(rows, limit, pg)
        return rows, pg

    def directions(self, group: NeuronGroup) -> int:
        """Rows of ``group`` with a direction (norm >= 1e-6) in this :meth:`penalty` call (all rows when the
        zero-norm policy is ``"error"``)."""
        n = self._directions.get(group.name)
        if n is None:
            shape = group.shape
            return shape[-2] * (shape[0] if len(shape) == 3 else 1)
        return n

    @property
    def energy_zero_norm(self) -> str:
        """The ``zero_norm`` argument to give the energy core: ``"error"`` or ``"exclude"``."""
        return "error" if self.zero_norm in (None, "error") else "exclude"

    # ------------------------------------------------------------------ the penalty
    def penalty(self, pl_module: L.LightningModule, batch: Any = None, log: bool = True) -> Tensor:
        """The total penalty for the current weights (and batch labels), with autograd graph.

        Public so that manual-optimization users can also add it to their own loss.
        """
        return self._penalty(pl_module, batch, log, self.max_grad_norm)

    def _penalty(self, pl_module: L.LightningModule, batch: Any, log: bool, limit: float | None) -> Tensor:
        if not self.layers:
            self.resolve(pl_module, None, self._trainer)
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        labels = self.label_getter(batch) if batch is not None else None
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        bad: tuple[NeuronGroup, Tensor] | None = None
        device_type = _device_type(pl_module)
        prefix = self.log_prefix
        self._cache, self._limit = {}, limit
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                if self.zero_norm in ("warn", "exclude"):
                    self._count_directions(step)
                for layer in self.layers:
                    try:
                        terms = self.layer_terms(layer, labels, step)
                    except ValueError as err:
                        self._raise_if_weights_diverged(step)
                        raise ValueError(f"{type(self).__name__}: layer {layer.name!r} at global step {step}: "
                                         f"{err}") from err
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
                            logs[f"{prefix}/{key}/{layer.name}"] = value.detach()
        finally:
            self._cache, self._limit = None, None
        if bad is not None:
            self._nonfinite(*bad, step=step)
            _SKIPPED_STEP[pl_module] = step
            total = None
        logged_total = bad[1].detach() if bad is not None else total
        if total is None:
            total = _zero_like_params(pl_module)
        if logged_total is None:
            logged_total = total
        if log and trainer is not None:
            sync = trainer.world_size > 1
            pl_module.log(f"{prefix}/penalty", logged_total.detach().float(), on_step=True, on_epoch=False,
                          sync_dist=sync, batch_size=1)
            for key, value in logs.items():
                pl_module.log(key, value.float(), on_step=True, on_epoch=False, sync_dist=sync, batch_size=1)
        return total

    def _count_directions(self, step: int) -> None:
        """Zero-norm policies ``"warn"``/``"exclude"``: count each group's rows with a direction (one host
        sync for all groups); ``"warn"`` warns once per fit when some rows have none."""
        if not self.layers:
            return
        rings = [self.ring_neurons(g) for g in self.layers]  # sharded layers on the ring: count their shards
        neurons = [r[0].detach() if r is not None else self.neurons(g).detach() for g, r in zip(self.layers, rings)]
        small = [(torch.linalg.vector_norm(n.float(), dim=-1) < MIN_NORM).sum() for n in neurons]
        counts = torch.stack(small).tolist()
        for i, r in enumerate(rings):
            if r is not None:
                import torch.distributed as dist

                both = torch.tensor([counts[i], neurons[i].shape[0]], dtype=torch.int64)
                dist.all_reduce(both, group=r[1])
                counts[i] = int(both[0])
                neurons[i] = neurons[i].new_empty((int(both[1]), 0))  # (only its number of rows is read below)
        self._directions = {}
        zero = []
        for g, n, c in zip(self.layers, neurons, counts):
            rows = n.shape[-2] * (n.shape[0] if n.dim() == 3 else 1)
            self._directions[g.name] = rows - int(c)
            if c:
                zero.append(f"{g.name!r} ({int(c)} of {rows})")
        if zero and self.zero_norm == "warn" and not self._warned_zero_norm:
            self._warned_zero_norm = True
            rank_zero_warn(
                f"{type(self).__name__}: neurons of zero norm (no direction) at global step {step}: "
                f"{', '.join(zero)}. They are left out of the penalty until they have a direction (e.g. a "
                "zero-initialized classifier after its first steps); this warning is given once per fit. "
                "zero_norm='exclude' does the same silently, zero_norm='error' stops instead",
                category=UserWarning)

    def _nonfinite(self, layer: NeuronGroup, term: Tensor, step: int) -> None:
        """The penalty itself is NaN/Inf while the weights are finite: blame the penalty."""
        msg = (f"{type(self).__name__}: the penalty of layer {layer.name!r} is {term.item()} at global step "
               f"{step} although its weights are finite (e.g. nearly identical or collapsing neurons)")
        if self.on_nonfinite == "error":
            raise FloatingPointError(msg + "; pass on_nonfinite='skip' to skip such optimizer steps, or lower the "
                                     "penalty's weight / ramp it in with warmup_steps")
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
        warnings.warn(f"{type(self).__name__}: the training loss is {float(loss.detach().float().sum())} at global "
                      f"step {step}; this optimizer step is skipped", RuntimeWarning, stacklevel=2)
        _SKIPPED_STEP[pl_module] = step

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
        self._assign_state_key(trainer)
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
        self._start_fit(trainer, pl_module)
        self._directions, self._warned_zero_norm = {}, False
        self._losses_since_step = 0
        self._names = None
        _SKIPPED_STEP.pop(pl_module, None)
        if pl_module.automatic_optimization:
            # "loss": adds the penalty to the returned loss; "gradient": counts the batches that returned a
            # loss, so a window whose training_step returned only None (a skipped batch) gets no penalty either
            _TrainingStepWrapper.attach(pl_module, self, keep=trainer.callbacks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # layers may be created in configure_model, which runs after setup: argument errors show here,
        # the groups are resolved on the first training batch
        self._precheck(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads: Sequence[Tensor | None] = [None] * len(params)
        skipped_batches = pl_module.automatic_optimization and self._losses_since_step == 0
        self._losses_since_step = 0
        if self._active_mode == "gradient" and not skipped_batches and self.due(trainer.global_step):
            k = self.every_n_steps
            with torch.enable_grad():
                total = self._penalty(pl_module, self._batch, True, self._scaled_limit(self.max_grad_norm, k))
                if total.requires_grad:
                    grads = torch.autograd.grad(total * k if k != 1 else total, params, allow_unused=True)
            if trainer.world_size > 1:
                # the penalty may depend on each rank's batch (labels): average its gradient like DDP
                # averages the loss gradient, or the replicas drift apart
                grads = self._mean_over_ranks(trainer, params, grads)
        skip = _SKIPPED_STEP.get(pl_module) == trainer.global_step
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
            _SKIPPED_STEP[pl_module] = trainer.global_step
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
        owned = {id(p) for layer in self.layers for p in layer.parameters()}
        # sharded (DTensor, FSDP2) weights: the gather's backward already averaged their penalty gradient
        index = [i for i, p in enumerate(params) if id(p) in owned and not is_dtensor(p)]
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
        trainer = self._trainer
        if self._active_mode != "loss" or not self.due(trainer.global_step if trainer is not None else 0):
            return None
        k = self.every_n_steps
        total = self._penalty(pl_module, batch, True, self._scaled_limit(self._loss_mode_limit(), k))
        return total * k if k != 1 else total

    @staticmethod
    def _scaled_limit(limit: float | None, k: int) -> float | None:
        """``max_grad_norm`` for a penalty multiplied by ``k`` (the bound is on the unscaled gradient)."""
        return None if limit is None else limit * k

    def _loss_mode_limit(self) -> float | None:
        """``max_grad_norm`` in the units of the gradient that reaches the neurons in ``mode="loss"``: Lightning
        divides the loss by ``accumulate_grad_batches`` (so the bound is per optimizer step) and an fp16
        GradScaler multiplies it by its scale."""
        limit = self.max_grad_norm
        trainer = self._trainer
        if limit is None or trainer is None:
            return limit
        limit = limit / max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            limit = limit * float(scaler.get_scale())
        return limit

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
    (:meth:`PenaltyCallback.after_training_step`) and adds the penalties they return to the loss.

    The wrapper is the one thing put on the user's module (an instance attribute ``training_step``, the
    only way to change what Lightning calls; removed on teardown); the list of attached callbacks is kept
    here, in a weak mapping module -> callbacks."""

    _attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def attach(cls, pl_module: L.LightningModule, callback: PenaltyCallback,
               keep: Sequence[Callback] | None = None) -> None:
        callbacks: list[PenaltyCallback] | None = cls._attached.get(pl_module)
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
            cls._attached[pl_module] = callbacks
        if callback not in callbacks:
            callbacks.append(callback)

    @classmethod
    def detach(cls, pl_module: L.LightningModule, callback: PenaltyCallback) -> None:
        callbacks = cls._attached.get(pl_module)
        if callbacks is None:
            return
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            pl_module.__dict__.pop("training_step", None)
            cls._attached.pop(pl_module, None)
