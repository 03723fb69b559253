"""MHE regularizer callback (thesis §5.3, Eq. 5.4; spec ``mhe.md`` §3, §6).

.. math::
    L = L_{data} + \\lambda_h \\sum_{l<L} \\bar E_s^{(l)} + \\lambda_o \\bar E_s(\\hat w^{out})

with :math:`\\bar E` the per-layer *mean pairwise* energy (each layer divided by its number of
ordered pairs). Half-space MHE applies to hidden layers only; the output layer is always
full-space (thesis D.1). A grouped convolution's energy is the mean over its channel groups (each
group is its own sphere).
"""
from __future__ import annotations

import warnings
from typing import Any
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_hyper.callbacks.base import DEFAULT_MAX_GRAD_NORM, MIN_NORM, ZERO_NORM_POLICIES, PenaltyCallback
from lightning_hyper.functional.checks import argument_error, check_choice, check_number
from lightning_hyper.functional.discrete import (METRICS as DH2L_METRICS, canonical_metric, metric_energy,
                                                 metric_energy_from_labels)
from lightning_hyper.functional.energy import hyperspherical_energy, output_energy_from_labels, validate_energy_args
from lightning_hyper.functional.seeding import seeded_generator
from lightning_hyper.functional.distributed import SHARDED_ENERGY_METHODS, ring_hyperspherical_energy
from lightning_hyper.nn.selection import NeuronGroup

__all__ = ["MHERegularizer", "OUTPUT_MODES", "HIDDEN_REDUCTIONS", "LARGE_OUTPUT"]

OUTPUT_MODES = ("auto", "full", "labels", "unique_labels")
HIDDEN_REDUCTIONS = ("sum", "mean")
#: ``output_mode="auto"`` uses the mini-batch (``"labels"``) output term above this many output neurons
#: (classes): the full output energy is O(C^2 d) per step (a 33k-word LM decoder made a small model's step
#: 2.7x slower), the labels form O(B C d)
LARGE_OUTPUT = 4096


class MHERegularizer(PenaltyCallback):
    """Minimum hyperspherical energy on a model's hidden and output layers, as a callback.

    Args:
        s: energy power (0 = logarithmic, 1 = Thomson, 2 = default of the thesis).
        metric: ``"euclidean"`` (MHE) or ``"angular"`` (A-MHE), or a DH2L metric name
            (:data:`lightning_hyper.functional.discrete.METRICS`: ``"bin"``, ``"AM"``, ``"HMcos'"``,
            ``"N-euclidean2"``, ``"angular2"``, ``"cosine"``, ...: DH2L's energy 'E', the mean pairwise term of
            :func:`~lightning_hyper.functional.discrete.metric_energy`; ``s``, ``angle_unit``,
            ``eps`` and ``chunk_size`` do not apply to those, and ``half_space`` is not supported).
            ``"angular"`` always means A-MHE (DH2L's metric of that name is left out).
        half_space: half-space MHE on hidden layers (the output layer stays full-space).
        hidden_weight: λ_h per hidden layer; ``None`` = 10 (full space) or 1 (half space), thesis D.1.
            ``0`` disables the hidden term.
        output_weight: λ_o for the output layer (``0`` disables it).
        output_mode: ``"full"`` (all classes), ``"labels"`` (mini-batch form of §5.3.6 / SphereFace+
            Eq. 5.8: rows of the classes in the batch, with multiplicity, against all classes),
            ``"unique_labels"`` (each present class once) or ``"auto"`` (default): ``"full"``, except for an
            output layer of more than :data:`LARGE_OUTPUT` = 4096 neurons (e.g. a language model's decoder),
            which gets ``"labels"``, with one notice on rank zero (pass ``output_mode="full"`` to keep the full
            energy there). The mode in force is :attr:`resolved_output_mode` once the layers are resolved.
        hidden_reduction: ``"sum"`` over hidden layers (Eq. 5.4) or ``"mean"``.
        angle_unit: ``"radian"`` (thesis) or ``"pi"`` (θ/π, authors' code), angular metric only.
        eps: kernel epsilon (see :func:`hyperspherical_energy`).
        neuron_batch_size: if set, each hidden layer's energy uses a random subset of this many neurons
            per step (§5.3.6; unbiased for the mean pairwise energy). Drawn from ``(seed, step)``.
        warmup_steps: λ ramps linearly from 0 over this many optimizer steps (stability, spec §5.8).
        zero_norm: neurons of (near) zero norm have no direction: ``"warn"`` (default: left out of the
            energy until they have one, with one warning per fit; e.g. a zero-initialized classifier),
            ``"exclude"`` (the same, silently) or ``"error"`` (stop, naming the layer).
        chunk_size: rows of a square Gram tile (default: cache-sized on CPU; see ``hyperspherical_energy``).
        seed: seed of the neuron subsets.
        sharded_energy: how the energy of a layer sharded by FSDP2 (``ModelParallelStrategy``, a ``DTensor``
            weight) is computed: ``"gather"`` (its full weight on every rank, one layer at a time), ``"ring"``
            (each rank keeps its rows; row blocks pass around the ranks, docs/distributed.md) or ``"auto"``
            (default: the ring from :data:`~lightning_hyper.functional.distributed.RING_MIN_ROWS` rows). The
            ring applies to the full-space and half-space energies of plain (ungrouped) layers without
            ``neuron_batch_size`` and, for the output layer, ``output_mode="full"``; others are gathered.
            Unsharded weights ignore it.
        include, exclude, layer_types, output_layer, inputs, verbose, mode, labels, on_nonfinite,
            max_grad_norm, prefix, every_n_steps: see :class:`~lightning_hyper.callbacks.base.PenaltyCallback`.

    Penalty strength: two terms with their own strength, ``hidden_weight`` (λ_h) and ``output_weight`` (λ_o),
    as in Eq. 5.4; the single-term callbacks call theirs ``weight``.

    Logs ``mhe/penalty`` and ``mhe/energy/<layer>`` (the layer's mean pairwise energy of the
    configured variant, on all neurons; for an output layer of more than :data:`LARGE_OUTPUT` neurons in a
    labels mode, the batch term the penalty uses, since all pairs are what that mode avoids computing).
    """

    prefix = "mhe"

    def __init__(self, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                 hidden_weight: float | None = None, output_weight: float = 1.0, output_mode: str = "auto",
                 hidden_reduction: str = "sum", angle_unit: str = "radian", eps: float = 1e-6,
                 neuron_batch_size: int | None = None, warmup_steps: int = 0, zero_norm: str = "warn",
                 chunk_size: int | None = None, seed: int = 0, sharded_energy: str = "auto",
                 include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True,
                 mode: str = "auto", labels: Callable[[Any], Tensor | None] | None = None,
                 on_nonfinite: str = "error", max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
                 prefix: str | None = None, every_n_steps: int = 1) -> None:
        super().__init__(include=include, exclude=exclude, layer_types=layer_types, output_layer=output_layer,
                         inputs=inputs, verbose=verbose, mode=mode, labels=labels, on_nonfinite=on_nonfinite,
                         max_grad_norm=max_grad_norm, prefix=prefix, every_n_steps=every_n_steps)
        owner = type(self).__name__
        # DH2L names (functional/discrete.py), the baselines included; "angular" keeps its MHE meaning (A-MHE,
        # thesis §5.3.3): DH2L's continuous-angle metric of that name is not reachable from here
        dh2l_names = [m for m in DH2L_METRICS if m != "angular"]
        self._dh2l_metric = isinstance(metric, str) and (
            metric in dh2l_names or (metric.endswith("_prime") and metric[:-6] + "'" in dh2l_names))
        if not self._dh2l_metric and metric not in ("euclidean", "angular"):
            argument_error("metric", metric, "'euclidean', 'angular' or a DH2L metric name "
                           + ", ".join(repr(m) for m in dh2l_names), owner=owner)
        if self._dh2l_metric and half_space:
            argument_error("half_space", half_space, f"False with the DH2L metric {metric!r}", owner=owner,
                           fix="half_space=False, or metric='euclidean'/'angular'")
        validate_energy_args(s, "euclidean" if self._dh2l_metric else metric, "mean", angle_unit, eps)
        check_choice("output_mode", output_mode, OUTPUT_MODES, owner=owner)
        check_choice("hidden_reduction", hidden_reduction, HIDDEN_REDUCTIONS, owner=owner)
        check_choice("zero_norm", zero_norm, ZERO_NORM_POLICIES, owner=owner)
        check_number("neuron_batch_size", neuron_batch_size, low=2, low_inclusive=True, integer=True, allow_none=True,
                     owner=owner)
        check_number("warmup_steps", warmup_steps, low=0, low_inclusive=True, integer=True, owner=owner)
        self.s = float(s)
        self.metric = canonical_metric(metric) if self._dh2l_metric else metric
        self.half_space = bool(half_space)
        default_hidden = 1.0 if half_space else 10.0
        self.hidden_weight = default_hidden if hidden_weight is None else check_number(
            "hidden_weight", hidden_weight, low=0, low_inclusive=True, owner=owner)
        self.output_weight = check_number("output_weight", output_weight, low=0, low_inclusive=True, owner=owner)
        self.output_mode = output_mode
        #: the output mode in force ("auto" resolved when the layers are resolved, on the first training batch)
        self.resolved_output_mode = "full" if output_mode == "auto" else output_mode
        self.hidden_reduction = hidden_reduction
        self.angle_unit = angle_unit
        self.eps = float(eps)
        self.neuron_batch_size = neuron_batch_size
        self.warmup_steps = warmup_steps
        self.zero_norm = zero_norm
        self.chunk_size = chunk_size
        self.seed = int(seed)
        self.sharded_energy = check_choice("sharded_energy", sharded_energy, SHARDED_ENERGY_METHODS,
                                           owner="MHERegularizer")
        self._warned_no_labels = False

    # ------------------------------------------------------------------ helpers
    def validate_layers(self, layers: list[NeuronGroup]) -> None:
        """Resolve ``output_mode="auto"``: ``"labels"`` for an output layer of more than :data:`LARGE_OUTPUT`
        neurons (one notice on rank zero), else ``"full"``."""
        if self.output_mode != "auto":
            return
        self.resolved_output_mode = "full"
        for layer in layers:
            shape = layer.shape
            if layer.role == "output" and len(shape) == 2 and shape[0] > LARGE_OUTPUT and self.output_weight:
                self.resolved_output_mode = "labels"
                rank_zero_info(
                    f"{type(self).__name__}: output layer {layer.name!r} has {shape[0]} neurons (> {LARGE_OUTPUT}): "
                    "its energy term uses the batch's labels (output_mode='labels', the mini-batch form) instead of "
                    f"all {shape[0]}x{shape[0]} pairs. Pass output_mode='full' to force the full output energy.")

    def energy(self, neurons: Tensor, role: str) -> Tensor:
        """Mean pairwise energy of this callback's variant for a layer of the given role: ``(N, d)`` ->
        its energy; ``(G, N, d)`` (a grouped convolution) -> the mean over the G groups."""
        if self._dh2l_metric:
            if neurons.dim() == 3:
                return torch.stack([self.energy(n, role) for n in neurons]).mean()
            if self.energy_zero_norm == "exclude":
                neurons, _ = _with_direction(neurons)
            return metric_energy(neurons, metric=self.metric)
        e = hyperspherical_energy(
            neurons, s=self.s, metric=self.metric, half_space=self.half_space and role == "hidden",
            reduction="mean", angle_unit=self.angle_unit, eps=self.eps, chunk_size=self.chunk_size,
            zero_norm=self.energy_zero_norm,
        )
        return e.mean() if e.dim() else e

    def _ramp(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)

    def _subset(self, neurons: Tensor, layer_index: int, step: int) -> Tensor:
        n = neurons.shape[-2]
        if self.neuron_batch_size is None or n <= self.neuron_batch_size:
            return neurons
        gen = seeded_generator(self.seed, step, layer_index)
        idx = torch.randperm(n, generator=gen)[: self.neuron_batch_size].to(neurons.device)
        return neurons[..., idx, :]

    # ------------------------------------------------------------------ PenaltyCallback API
    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        if self.directions(layer) < 2:
            return None
        ring = self._ring(layer)
        if ring is not None:  # a row-sharded (FSDP2) layer whose rows stay on their ranks
            return self._ring_terms(layer, ring, step)
        neurons = self.neurons(layer)
        if neurons.shape[-2] < 2:
            return None
        ramp = self._ramp(step)
        if layer.role == "hidden":
            if self.hidden_weight == 0:
                return None
            n_hidden = sum(1 for ref in self.layers if ref.role == "hidden")
            weight = self.hidden_weight / (n_hidden if self.hidden_reduction == "mean" else 1)
            sub = self._subset(neurons, self.layers.index(layer), step)
            energy = self.energy(sub, "hidden")
            if sub is not neurons:
                with torch.no_grad():
                    full = self.energy(neurons, "hidden")
            else:
                full = energy
            return {"penalty": (weight * ramp) * energy, "energy": full}
        if self.output_weight == 0:
            return None
        term = None
        output_mode = self.resolved_output_mode
        if output_mode != "full":
            if labels is None:
                if not self._warned_no_labels:
                    warnings.warn(f"MHERegularizer(output_mode={output_mode!r}) found no labels in the batch; "
                                  "using the full output energy. Pass labels=<batch -> labels getter>.", stacklevel=2)
                    self._warned_no_labels = True
            elif neurons.dim() == 2:  # (a grouped output convolution keeps the full energy)
                labels = labels.flatten().long()
                unique = output_mode == "unique_labels"
                if self._dh2l_metric:
                    w = neurons
                    if self.energy_zero_norm == "exclude":
                        w, labels = _with_direction(neurons, labels)
                    term = metric_energy_from_labels(w, labels, metric=self.metric, unique=unique)
                else:
                    term = output_energy_from_labels(neurons, labels, s=self.s, metric=self.metric,
                                                     angle_unit=self.angle_unit, eps=self.eps, unique=unique,
                                                     zero_norm=self.energy_zero_norm)
        if term is None:
            full = term = self.energy(neurons, "output")
        elif neurons.shape[-2] > LARGE_OUTPUT:
            full = term.detach()  # all C^2 pairs of a large output layer are what the batch form avoids
        else:
            with torch.no_grad():
                full = self.energy(neurons, "output")
        return {"penalty": (self.output_weight * ramp) * term, "energy": full}


    def _ring(self, layer: NeuronGroup) -> tuple[Tensor, Any] | None:
        if self._dh2l_metric or self.neuron_batch_size is not None:
            return None
        if layer.role == "output" and self.output_mode != "full":
            return None
        return self.ring_neurons(layer)

    def _ring_terms(self, layer: NeuronGroup, ring: tuple[Tensor, Any], step: int) -> dict[str, Tensor] | None:
        """The terms of a row-sharded layer from :func:`~lightning_hyper.functional.distributed.
        ring_hyperspherical_energy` (the same values as the gathered path)."""
        if layer.role == "hidden":
            if self.hidden_weight == 0:
                return None
            n_hidden = sum(1 for ref in self.layers if ref.role == "hidden")
            weight = self.hidden_weight / (n_hidden if self.hidden_reduction == "mean" else 1)
        else:
            if self.output_weight == 0:
                return None
            weight = self.output_weight
        rows, group = ring
        energy = ring_hyperspherical_energy(
            rows, group=group, s=self.s, metric=self.metric, half_space=self.half_space and layer.role == "hidden",
            reduction="mean", angle_unit=self.angle_unit, eps=self.eps, chunk_size=self.chunk_size,
            zero_norm=self.energy_zero_norm)
        return {"penalty": (weight * self._ramp(step)) * energy, "energy": energy}


def _with_direction(w: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Rows of ``w`` with a direction (norm >= 1e-6) and the labels of those rows, renumbered."""
    keep = torch.linalg.vector_norm(w.detach().float(), dim=-1) >= MIN_NORM
    if bool(keep.all()):
        return w, labels
    if labels is not None:
        labels = labels.to(w.device)
        labels = (torch.cumsum(keep.long(), 0) - 1)[labels[keep[labels]]]
    return w[keep], labels
