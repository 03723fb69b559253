r"""Compressive MHE regularizer callback (thesis Ch. 6, Eqs. 6.3-6.9; spec ``comhe.md`` §2-§6).

.. math::
    L = L_{data} + \lambda_h \sum_{\ell\in hidden} \bar E^C_\ell + \lambda_o\,\bar E^{full}_{out}

:math:`\bar E^C_\ell` is the layer's compressive energy: the (half-space, by default) mean pairwise
energy of its neurons after projection to ``projection_dim`` dimensions, aggregated over the
projections (mean, Eq. 6.4, or max, Eq. 6.5). The output layer gets plain full-space MHE (no
projection, the authors' recipe). Hidden layers whose neuron dimension D is at most
``projection_dim`` get plain (half-space) MHE (``small_layer_fallback="mhe"``, e.g. the RGB first
conv with D = 27).

The projection options are one object, :class:`CoMHEProjection` (``projection=CoMHEProjection(...)``, or a
plain kind name ``projection="random"`` for its defaults; in YAML ``projection: {kind: ..., projection_dim: ...}``).
Names of the spec's §12 table and where they are here: ``variant`` -> ``CoMHEProjection.kind`` (``"rp"``,
``"ap"``, ``"adv"`` are accepted as aliases), ``proj_dim`` -> ``projection_dim``, ``num_proj`` ->
``num_projections``, ``resample_every`` -> ``refresh_every``, ``ap_mode`` -> ``mode``,
``ap_inner_steps``/``adv_inner_steps`` -> ``steps``, ``ap_update_every`` -> ``update_every``,
``ap_lr``/``adv_lr`` -> ``lr``, ``ap_unroll_lr`` -> ``unroll_lr``, ``ap_unroll_steps`` -> ``unroll_steps``,
``ap_weight_decay`` -> ``weight_decay``, ``ap_loss`` -> ``angle_loss`` (all fields of :class:`CoMHEProjection`);
``weight`` -> ``CoMHERegularizer(hidden_weight=)``, ``output_layer={"mode": "mhe_full", "weight": w}`` ->
``output_weight=w`` (0 = none), ``dist_eps`` -> ``eps``. The Eq. E.2 log metric (s=1, half-space) is available
from :class:`~lightning_hyper.callbacks.EnergyMonitor`.

Deprecated (one release, ``DeprecationWarning``): the flat keyword arguments of the projection options,
``CoMHERegularizer(projection_dim=..., num_projections=..., refresh_every=..., aggregate=...,
share_projection=..., projection_mode=..., projection_steps=..., projection_update_every=..., projection_lr=...,
unroll_lr=..., unroll_steps=..., projection_weight_decay=..., angle_loss=..., reinit_every=..., group_size=...,
group_mode=..., small_layer_fallback=...)``; they map to the :class:`CoMHEProjection` fields of :data:`FLAT_NAMES`.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_hyper.callbacks.base import (DEFAULT_MAX_GRAD_NORM, MIN_NORM, ZERO_NORM_POLICIES, PenaltyCallback,
                                           renamed_argument)
from lightning_hyper.functional.checks import argument_error, check_choice, check_number
from lightning_hyper.functional.energy import hyperspherical_energy, validate_energy_args
from lightning_hyper.functional.projection import (
    AGGREGATES,
    ANGLE_LOSSES,
    adversarial_step,
    angle_preserving_step,
    compressive_energy,
    group_energy,
    projection_generator,
    random_projections,
    unrolled_adversarial_projection,
    unrolled_angle_projection,
)
from lightning_hyper.nn.selection import NeuronGroup

__all__ = ["CoMHEProjection", "CoMHERegularizer", "FLAT_NAMES", "PROJECTIONS", "PROJECTION_MODES", "GROUP_MODES",
           "SMALL_LAYER_FALLBACKS"]

PROJECTIONS = ("random", "angle_preserving", "adversarial", "group")
_ALIASES = {"rp": "random", "ap": "angle_preserving", "adv": "adversarial"}
PROJECTION_MODES = ("unrolled", "alternating")
GROUP_MODES = ("consecutive", "stochastic")
SMALL_LAYER_FALLBACKS = ("mhe", "project")

# stream tags: draws of different purposes never share a seed
_TAG_RANDOM, _TAG_INIT, _TAG_PERM = 1, 2, 3


def _opt_int(value: Any, arg: str, minimum: int, none_means: str, owner: str) -> None:
    check_number(arg, value, low=minimum, low_inclusive=True, integer=True, allow_none=True, owner=owner,
                 fix=f"None means {none_means}")


def _lr_arg(value: Any, arg: str, owner: str) -> str | float:
    if value == "tied":
        return "tied"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        argument_error(arg, value, "'tied' (the current learning rate of the model optimizer's first param group) "
                       "or a finite number >= 0", owner=owner)
    return float(value)


#: the deprecated flat keyword arguments of ``CoMHERegularizer`` -> the :class:`CoMHEProjection` field
FLAT_NAMES = {
    "projection_dim": "projection_dim", "num_projections": "num_projections", "refresh_every": "refresh_every",
    "aggregate": "aggregate", "share_projection": "shared", "projection_mode": "mode", "projection_steps": "steps",
    "projection_update_every": "update_every", "projection_lr": "lr", "unroll_lr": "unroll_lr",
    "unroll_steps": "unroll_steps", "projection_weight_decay": "weight_decay", "angle_loss": "angle_loss",
    "reinit_every": "reinit_every", "group_size": "group_size", "group_mode": "group_mode",
    "small_layer_fallback": "small_layer_fallback",
}
#: default of the deprecated flat ``refresh_every`` meaning "not given" (``None`` there means "never redraw")
_REFRESH_NOT_GIVEN = -1


@dataclass
class CoMHEProjection:
    """The projection options of :class:`CoMHERegularizer`, one object (YAML: ``projection: {kind: ..., ...}``).

    Args:
        kind: ``"random"`` (RP-CoMHE, thesis §6.3.1), ``"angle_preserving"`` (AP-CoMHE, §6.3.2),
            ``"adversarial"`` (Adv-CoMHE, §6.3.3) or ``"group"`` (G-CoMHE, §6.3.4); ``"rp"``, ``"ap"``, ``"adv"``
            are aliases.
        projection_dim: rows k of each projection (30: Table 6.2).
        num_projections: C; ``None`` = 5 for random (Table 6.3), 1 for angle-preserving/adversarial.
            Unused by ``"group"`` (the groups are the projections).
        refresh_every: redraw random projections (and the stochastic group partition) every this many optimizer
            steps (1 = every step, Table E.4); ``None`` = draw once and keep.
        aggregate: ``"mean"`` (Eq. 6.4) or ``"max"`` (Eq. 6.5) over the projections.
        shared: layers with the same neuron dimension D use the same projections (§6.3.6); ``None`` = True for
            random, False for angle-preserving/adversarial (the authors' code).
        mode: angle-preserving/adversarial only. ``"unrolled"`` (default, best in Table 6.1): the network
            minimizes the energy at :math:`P' = P \\mp \\eta\nabla_P` (``unroll_steps`` steps kept in the graph,
            so W also gets the second-order terms); ``"alternating"``: the energy at P, P updated in turn.
        steps: SGD steps on P per update; ``None`` = 1 (angle-preserving), 10 (adversarial).
        update_every: optimizer steps between P updates; ``None`` = 1 (unrolled), 10 (alternating).
        lr: step size of the P updates; ``"tied"`` = the model optimizer's current lr.
        unroll_lr: η of the unrolled step; ``"tied"`` as above.
        unroll_steps: unrolled steps.
        weight_decay: L2 on P in its updates (5e-7 ≈ the authors' 1e-3 · 5e-4).
        angle_loss: ``"cos_fro"`` (default), ``"cos_sq"`` or ``"angle_sq"``
            (:func:`~lightning_hyper.functional.projection.angle_preservation_loss`).
        reinit_every: re-draw learned P from N(0, 1) every this many steps (``None`` = never).
        group_size: input channels per group (8, Table 6.1); a layer with fewer channels is one group.
        group_mode: ``"consecutive"`` channel groups or ``"stochastic"`` (a random coordinate partition,
            redrawn every ``refresh_every`` steps).
        small_layer_fallback: ``"mhe"`` (D <= projection_dim: plain MHE, no projection) or ``"project"``
            (random / learned projections; ``"group"`` falls back when a layer has at most one group).

    Validated at construction (errors name the field); ``kind`` is stored with its alias resolved.
    """

    kind: str = "random"
    projection_dim: int = 30
    num_projections: int | None = None
    refresh_every: int | None = 1
    aggregate: str = "mean"
    shared: bool | None = None
    mode: str = "unrolled"
    steps: int | None = None
    update_every: int | None = None
    lr: str | float = "tied"
    unroll_lr: str | float = "tied"
    unroll_steps: int = 1
    weight_decay: float = 5e-7
    angle_loss: str = "cos_fro"
    reinit_every: int | None = None
    group_size: int = 8
    group_mode: str = "consecutive"
    small_layer_fallback: str = "mhe"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, names: dict[str, str] | None = None, owner: str = "CoMHEProjection") -> None:
        """Check every field; ``names`` maps a field to the name an error reports (the deprecated flat names)."""
        name = {f.name: f.name for f in dataclasses.fields(self)}
        name.update(names or {})
        kind = _ALIASES.get(self.kind, self.kind) if isinstance(self.kind, str) else self.kind
        check_choice(name["kind"], kind, PROJECTIONS, owner=owner, fix=f"aliases {sorted(_ALIASES)}")
        self.kind = kind
        check_number(name["projection_dim"], self.projection_dim, low=1, low_inclusive=True, integer=True, owner=owner)
        _opt_int(self.num_projections, name["num_projections"], 1, "5 for random, 1 for learned projections", owner)
        _opt_int(self.refresh_every, name["refresh_every"], 1, "never redraw", owner)
        check_choice(name["aggregate"], self.aggregate, AGGREGATES, owner=owner)
        check_choice(name["shared"], self.shared, (None, True, False), owner=owner)
        check_choice(name["mode"], self.mode, PROJECTION_MODES, owner=owner)
        _opt_int(self.steps, name["steps"], 0, "1 for angle_preserving, 10 for adversarial", owner)
        _opt_int(self.update_every, name["update_every"], 1, "1 unrolled, 10 alternating", owner)
        self.lr = _lr_arg(self.lr, name["lr"], owner)
        self.unroll_lr = _lr_arg(self.unroll_lr, name["unroll_lr"], owner)
        check_number(name["unroll_steps"], self.unroll_steps, low=1, low_inclusive=True, integer=True, owner=owner)
        self.weight_decay = check_number(name["weight_decay"], self.weight_decay, low=0, low_inclusive=True,
                                         owner=owner)
        check_choice(name["angle_loss"], self.angle_loss, ANGLE_LOSSES, owner=owner)
        _opt_int(self.reinit_every, name["reinit_every"], 1, "never", owner)
        check_number(name["group_size"], self.group_size, low=1, low_inclusive=True, integer=True, owner=owner)
        check_choice(name["group_mode"], self.group_mode, GROUP_MODES, owner=owner)
        check_choice(name["small_layer_fallback"], self.small_layer_fallback, SMALL_LAYER_FALLBACKS, owner=owner)

    @property
    def learned(self) -> bool:
        """Angle-preserving or adversarial (learned P)."""
        return self.kind in ("angle_preserving", "adversarial")


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode()) + 1  # deterministic across processes (unlike hash(str))


class CoMHERegularizer(PenaltyCallback):
    """Compressive minimum hyperspherical energy on a model's layers, as a callback.

    Args:
        projection: the projection options, a :class:`CoMHEProjection` (kind, projection_dim, num_projections,
            refresh_every, aggregate, shared, mode, steps, update_every, lr, unroll_lr, unroll_steps,
            weight_decay, angle_loss, reinit_every, group_size, group_mode, small_layer_fallback; see there), or
            a kind name (``"random"``, ``"angle_preserving"``, ``"adversarial"``, ``"group"``, or the aliases
            ``"rp"``, ``"ap"``, ``"adv"``) for that kind's defaults. In YAML: ``projection: random`` or
            ``projection: {kind: angle_preserving, steps: 3}``.
        s, metric, eps: energy power, distance and kernel epsilon (see ``hyperspherical_energy``).
        half_space: half-space energy of the (projected) hidden layers (default, §1.3); the output
            layer is always full-space.
        hidden_weight: λ_h, the same for every hidden layer (1, thesis E.1). ``0`` disables them.
        output_weight: λ_o of the output layer's full-space MHE (10 in the authors' code); ``0`` = none.
            (Two terms, two strengths, as :class:`~lightning_hyper.callbacks.MHERegularizer`; the single-term
            callbacks call theirs ``weight``.)
        full_energy_every: compute the unprojected energy for logging every this many steps;
            ``None`` = the Trainer's ``log_every_n_steps``; ``0`` = never.
        chunk_size, zero_norm: see :class:`~lightning_hyper.callbacks.MHERegularizer` (``zero_norm="warn"``
            by default: rows without a direction are left out, with one warning per fit).
        seed: seed of every random draw; the generator of a draw is seeded from
            ``(seed, global_step // refresh_every, D or layer)`` on the weights' device, so every DDP rank
            draws the same projections and a resumed run continues identically.
        include, exclude, layer_types, output_layer, inputs, verbose, mode, labels, on_nonfinite,
            max_grad_norm, prefix, every_n_steps: see :class:`~lightning_hyper.callbacks.base.PenaltyCallback`.
        projection_dim, num_projections, refresh_every, aggregate, share_projection, projection_mode,
            projection_steps, projection_update_every, projection_lr, unroll_lr, unroll_steps,
            projection_weight_decay, angle_loss, reinit_every, group_size, group_mode, small_layer_fallback:
            deprecated (``DeprecationWarning``, removed in a future release): the flat form of the
            :class:`CoMHEProjection` fields (:data:`FLAT_NAMES`); keyword-only, ``None`` = not given
            (``refresh_every``: ``-1`` = not given, ``None`` = never redraw, as before).

    Attributes: :attr:`projection_options` (the :class:`CoMHEProjection` in force) and, as before, the resolved
    options under their old names (``projection`` = the kind, ``projection_dim``, ``num_projections``,
    ``share_projection``, ``projection_steps``, ``projection_update_every``, ...).

    A grouped convolution's term is the mean over its channel groups (each group's neurons are
    projected and their energy computed on their own).

    Logs ``comhe/penalty``, per layer ``comhe/energy/<layer>`` (the compressed energy the penalty
    uses, unweighted) and ``comhe/full_energy/<layer>`` (the energy of the original, unprojected
    neurons with the same s and half-space setting, so one can see the true energy fall).

    State (``state_dict``): the seed, the learned projections (angle-preserving/adversarial, one per
    layer or per D), the step of their last update and the projections drawn last (random).

    Note (adversarial, unrolled): the energy core's custom backward is exact but not twice
    differentiable, so the second-order terms of the unrolled ascent step
    :math:`P' = P + \\eta\\nabla_P E^V` reach W through a central finite-difference Hessian-vector
    product (:func:`~lightning_hyper.functional.projection.unrolled_adversarial_projection`).
    """

    prefix = "comhe"

    def __init__(self, projection: str | CoMHEProjection = "random", *, s: float = 2.0, half_space: bool = True,
                 metric: str = "euclidean", hidden_weight: float = 1.0, output_weight: float = 10.0,
                 full_energy_every: int | None = None, eps: float = 1e-6, chunk_size: int | None = None,
                 zero_norm: str = "warn", seed: int = 0,
                 include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True,
                 mode: str = "auto", labels: Callable[[Any], Tensor | None] | None = None,
                 on_nonfinite: str = "error", max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
                 prefix: str | None = None, every_n_steps: int = 1,
                 projection_dim: int | None = None, num_projections: int | None = None,
                 refresh_every: int | None = _REFRESH_NOT_GIVEN, aggregate: str | None = None,
                 share_projection: bool | None = None, projection_mode: str | None = None,
                 projection_steps: int | None = None, projection_update_every: int | None = None,
                 projection_lr: str | float | None = None, unroll_lr: str | float | None = None,
                 unroll_steps: int | None = None, projection_weight_decay: float | None = None,
                 angle_loss: str | None = None, reinit_every: int | None = None, group_size: int | None = None,
                 group_mode: str | None = None, small_layer_fallback: str | None = None) -> None:
        super().__init__(include=include, exclude=exclude, layer_types=layer_types, output_layer=output_layer,
                         inputs=inputs, verbose=verbose, mode=mode, labels=labels, on_nonfinite=on_nonfinite,
                         max_grad_norm=max_grad_norm, prefix=prefix, every_n_steps=every_n_steps)
        owner = type(self).__name__
        flat = {k: v for k, v in dict(
            projection_dim=projection_dim, num_projections=num_projections, refresh_every=refresh_every,
            aggregate=aggregate, share_projection=share_projection, projection_mode=projection_mode,
            projection_steps=projection_steps, projection_update_every=projection_update_every,
            projection_lr=projection_lr, unroll_lr=unroll_lr, unroll_steps=unroll_steps,
            projection_weight_decay=projection_weight_decay, angle_loss=angle_loss, reinit_every=reinit_every,
            group_size=group_size, group_mode=group_mode, small_layer_fallback=small_layer_fallback).items()
            if (v is not None if k != "refresh_every" else v != _REFRESH_NOT_GIVEN)}
        options = self._projection_options(projection, flat, owner)
        validate_energy_args(s, metric, "mean", "radian", eps)
        _opt_int(full_energy_every, "full_energy_every", 0, "the Trainer's log_every_n_steps", owner)
        check_choice("zero_norm", zero_norm, ZERO_NORM_POLICIES, owner=owner)
        check_number("seed", seed, integer=True, owner=owner)
        learned = options.learned
        self.projection_options = options
        # the resolved options, under their old names (read by the penalty and by users' code)
        self.projection = options.kind
        self.projection_dim = options.projection_dim
        self.num_projections = options.num_projections if options.num_projections is not None else (1 if learned else 5)
        self.refresh_every = options.refresh_every
        self.aggregate = options.aggregate
        self.share_projection = options.shared if options.shared is not None else not learned
        self.projection_mode = options.mode
        self.projection_steps = options.steps if options.steps is not None else (10 if options.kind == "adversarial"
                                                                                 else 1)
        self.projection_update_every = (options.update_every if options.update_every is not None
                                        else (10 if options.mode == "alternating" else 1))
        self.projection_lr = options.lr
        self.unroll_lr = options.unroll_lr
        self.unroll_steps = options.unroll_steps
        self.projection_weight_decay = options.weight_decay
        self.angle_loss = options.angle_loss
        self.reinit_every = options.reinit_every
        self.group_size = options.group_size
        self.group_mode = options.group_mode
        self.small_layer_fallback = options.small_layer_fallback
        self.s = float(s)
        self.half_space = bool(half_space)
        self.metric = metric
        self.hidden_weight = check_number("hidden_weight", hidden_weight, low=0, low_inclusive=True, owner=owner)
        self.output_weight = check_number("output_weight", output_weight, low=0, low_inclusive=True, owner=owner)
        self.full_energy_every = full_energy_every
        self.eps = float(eps)
        self.chunk_size = chunk_size
        self.zero_norm = zero_norm
        self.seed = int(seed)
        # state
        self._learned: dict[str, Tensor] = {}  # key -> (C, k, D) learned projections (AP / Adv)
        self._init_period: dict[str, int] = {}  # key -> re-initialization period of that P
        self._last_update_step: int | None = None  # global step of the last P update (AP / Adv)
        self._drawn: dict[str, Tensor] = {}  # key -> random projections / permutation of the current period
        self._drawn_period: int | None = None
        self._prepared_step: int | None = None

    @staticmethod
    def _projection_options(projection: Any, flat: dict[str, Any], owner: str) -> CoMHEProjection:
        """The :class:`CoMHEProjection` of ``projection`` (an object or a kind name) and the deprecated flat
        keyword arguments ``flat`` (old name -> value; only those given)."""
        if isinstance(projection, CoMHEProjection):
            if flat:
                argument_error(sorted(flat)[0], flat[sorted(flat)[0]],
                               "not together with projection=CoMHEProjection(...)",
                               owner=owner, fix="set the option on the CoMHEProjection (fields: "
                               + ", ".join(f"{k} -> {FLAT_NAMES[k]}" for k in sorted(flat)) + ")")
            return dataclasses.replace(projection)  # a validated copy: the callback never shares the user's object
        if isinstance(projection, dict):  # (a mapping of fields, e.g. from a config read without jsonargparse)
            return CoMHEProjection(**projection)
        if not isinstance(projection, str):
            argument_error("projection", projection, "a CoMHEProjection or a kind name: "
                           + ", ".join(repr(p) for p in PROJECTIONS), owner=owner)
        for old, value in flat.items():
            renamed_argument(owner, old, f"projection=CoMHEProjection({FLAT_NAMES[old]}=...)", value, stacklevel=4)
        options = CoMHEProjection.__new__(CoMHEProjection)
        for f in dataclasses.fields(CoMHEProjection):
            setattr(options, f.name, f.default)
        options.kind = projection
        for old, value in flat.items():
            setattr(options, FLAT_NAMES[old], value)
        names = {new: old for old, new in FLAT_NAMES.items() if old in flat}
        names["kind"] = "projection"
        options.validate(names, owner)
        return options

    # ------------------------------------------------------------------ keys and draws
    def _key(self, layer: NeuronGroup, dim: int) -> str:
        return f"dim={dim}" if self.share_projection else layer.name

    def _key_ints(self, key: str, dim: int) -> tuple[int, int]:
        return (dim, 0) if key.startswith("dim=") else (dim, _name_key(key))

    def _period(self, step: int, every: int | None) -> int:
        return 0 if every is None else step // every

    def _projected(self, layer: NeuronGroup, dim: int) -> bool:
        """Whether a hidden layer of neuron dimension ``dim`` is projected (else plain MHE)."""
        return dim > self.projection_dim or self.small_layer_fallback == "project"

    def _random_draw(self, key: str, dim: int, step: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        period = self._period(step, self.refresh_every)
        if self._drawn_period != period:
            self._drawn, self._drawn_period = {}, period
        p = self._drawn.get(key)
        if p is None or p.device != device or p.dtype != dtype:
            p = self.projections_at(step, dim, None if key.startswith("dim=") else key, device=device, dtype=dtype)
            self._drawn[key] = p
        return p

    def projections_at(self, step: int, dim: int, layer: str | None = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """The random projections ``(C, k, D)`` in force at global step ``step`` for neurons of dimension ``dim``.

        ``layer`` is the layer's module name when ``share_projection=False`` (``None``: the basis shared
        by every layer of that D). The draw is
        ``random_projections(C, k, D, generator=projection_generator(seed, step, refresh_every, 1, D, key))``
        with ``key = 0`` (shared) or ``zlib.crc32(layer) + 1``: a pure function of these integers.
        """
        key = (dim, 0) if layer is None else (dim, _name_key(layer))
        gen = projection_generator(self.seed, step, self.refresh_every, _TAG_RANDOM, *key, device=device)
        return random_projections(self.num_projections, self.projection_dim, dim, generator=gen, dtype=dtype,
                                  device=device)

    def _permutation(self, key: str, dim: int, step: int, device: torch.device) -> Tensor | None:
        if self.group_mode == "consecutive":
            return None
        period = self._period(step, self.refresh_every)
        if self._drawn_period != period:
            self._drawn, self._drawn_period = {}, period
        perm = self._drawn.get(key)
        if perm is None or perm.device != device:
            gen = projection_generator(self.seed, step, self.refresh_every, _TAG_PERM,
                                       *self._key_ints(key, dim), device=device)
            perm = torch.randperm(dim, generator=gen, device=device)
            self._drawn[key] = perm
        return perm

    def _learned_projection(self, key: str, dim: int, step: int, device: torch.device,
                            dtype: torch.dtype) -> Tensor:
        """The persistent P of ``key`` (drawn from N(0, 1) at first use and every ``reinit_every``)."""
        period = self._period(step, self.reinit_every)
        p = self._learned.get(key)
        if p is not None and tuple(p.shape) != (self.num_projections, self.projection_dim, dim):
            raise ValueError(f"the restored projection {key!r} has shape {tuple(p.shape)}, expected "
                             f"{(self.num_projections, self.projection_dim, dim)} (num_projections, projection_dim, D);"
                             " the checkpoint was written with other settings")
        if p is None or self._init_period.get(key) != period:
            gen = projection_generator(self.seed, period, 1, _TAG_INIT, *self._key_ints(key, dim), device=device)
            p = random_projections(self.num_projections, self.projection_dim, dim, generator=gen, dtype=dtype,
                                   device=device)
            self._init_period[key] = period
        p = p.to(device=device, dtype=dtype)
        self._learned[key] = p
        return p

    def _lr(self, value: str | float, arg: str) -> float:
        if value != "tied":
            return float(value)
        trainer = self._trainer
        optimizers = getattr(trainer, "optimizers", None) if trainer is not None else None
        if not optimizers:
            raise ValueError(f"{arg}='tied' reads the learning rate of the Trainer's first optimizer, but there is "
                             "none (penalty called outside fit?); pass a number")
        return float(optimizers[0].param_groups[0]["lr"])

    # ------------------------------------------------------------------ per-step preparation
    def _hidden_sets(self, layer: NeuronGroup) -> list[Tensor]:
        """The layer's neuron sets ``(N, d)``: one, or one per channel group of a grouped convolution; rows
        without a direction are dropped under the ``"warn"``/``"exclude"`` zero-norm policies."""
        neurons = self.neurons(layer)
        sets = list(neurons) if neurons.dim() == 3 else [neurons]
        rows = sum(n.shape[0] for n in sets)
        # inside penalty() the rows without a direction were counted for all layers at once (one sync)
        if self.energy_zero_norm == "exclude" and rows and (self._cache is None or self.directions(layer) < rows):
            sets = [n[torch.linalg.vector_norm(n.detach(), dim=1) >= MIN_NORM] for n in sets]
        return sets

    def _prepare_step(self, step: int) -> None:
        """Once per optimizer step: update the learned projections (angle-preserving / adversarial)."""
        if self._prepared_step == step:
            return
        self._prepared_step = step
        if self.projection not in ("angle_preserving", "adversarial") or self.hidden_weight == 0:
            return
        groups: dict[str, list[Tensor]] = {}
        for layer in self.layers:
            if layer.role != "hidden":
                continue
            for w in self._hidden_sets(layer):
                w = w.detach()
                if w.shape[0] < 2 or not self._projected(layer, w.shape[1]):
                    continue
                groups.setdefault(self._key(layer, w.shape[1]), []).append(w)
        due = step % self.projection_update_every == 0 and self._last_update_step != step
        for key, ws in groups.items():
            dtype = torch.float64 if ws[0].dtype == torch.float64 else torch.float32
            p = self._learned_projection(key, ws[0].shape[1], step, ws[0].device, dtype)
            if not due or self.projection_steps == 0:
                continue
            lr = self._lr(self.projection_lr, "projection_lr")  # (CoMHEProjection.lr)
            if self.projection == "angle_preserving":
                p = angle_preserving_step(ws, p, lr=lr, steps=self.projection_steps, loss=self.angle_loss,
                                          weight_decay=self.projection_weight_decay)
            else:
                p = adversarial_step(ws, p, lr=lr, steps=self.projection_steps, s=self.s,
                                     weight_decay=self.projection_weight_decay, metric=self.metric, eps=self.eps)
            self._learned[key] = p
        if due:
            self._last_update_step = step

    def _full_energy_due(self, step: int) -> bool:
        every = self.full_energy_every
        if every is None:
            every = getattr(self._trainer, "log_every_n_steps", 1) if self._trainer is not None else 1
        return bool(every) and step % max(int(every), 1) == 0

    # ------------------------------------------------------------------ the penalty of one layer
    def energy(self, neurons: Tensor, role: str = "hidden") -> Tensor:
        """Unprojected mean pairwise energy (half-space on hidden layers), as logged in ``full_energy``."""
        e = hyperspherical_energy(neurons, s=self.s, metric=self.metric,
                                  half_space=self.half_space and role == "hidden", eps=self.eps,
                                  chunk_size=self.chunk_size, zero_norm=self.energy_zero_norm)
        return e.mean() if e.dim() else e  # a grouped convolution: the mean over its groups

    def compressed_energy(self, layer: NeuronGroup, neurons: Tensor, step: int) -> Tensor:
        """The layer's CoMHE energy at ``step`` (with autograd graph to the weights)."""
        dim = neurons.shape[1]
        kw = dict(s=self.s, half_space=self.half_space, metric=self.metric, eps=self.eps, chunk_size=self.chunk_size)
        if self.projection == "group":
            weight = layer.weight()
            kernel = math.prod(weight.shape[2:]) if isinstance(weight, Tensor) and weight.dim() > 2 else 1
            width = self.group_size * kernel
            if width >= dim:  # fewer channels than one group: plain (HS-)MHE
                return hyperspherical_energy(neurons, **kw)
            perm = self._permutation(self._key(layer, dim), dim, step, neurons.device)
            return group_energy(neurons, width, aggregate=self.aggregate, permutation=perm, **kw)
        if not self._projected(layer, dim):
            return hyperspherical_energy(neurons, **kw)
        dtype = torch.float64 if neurons.dtype == torch.float64 else torch.float32
        key = self._key(layer, dim)
        if self.projection == "random":
            p = self._random_draw(key, dim, step, neurons.device, dtype)
        else:
            p = self._learned_projection(key, dim, step, neurons.device, dtype)
            if self.projection_mode == "unrolled":
                eta = self._lr(self.unroll_lr, "unroll_lr")
                if self.projection == "angle_preserving":
                    p = unrolled_angle_projection(neurons, p, lr=eta, steps=self.unroll_steps, loss=self.angle_loss)
                else:
                    p = unrolled_adversarial_projection(neurons, p, lr=eta, steps=self.unroll_steps, s=self.s,
                                                        metric=self.metric, eps=self.eps)
        return compressive_energy(neurons, p, aggregate=self.aggregate, **kw)

    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        if self.directions(layer) < 2:
            return None
        if layer.role == "output":
            if self.output_weight == 0:
                return None
            neurons = self.neurons(layer)
            if neurons.shape[-2] < 2:
                return None
            full = self.energy(neurons, "output")
            return {"penalty": self.output_weight * full, "energy": full.detach(), "full_energy": full.detach()}
        if self.hidden_weight == 0:
            return None
        self._prepare_step(step)
        sets = [n for n in self._hidden_sets(layer) if n.shape[0] >= 2]
        if not sets:
            return None
        energies = [self.compressed_energy(layer, n, step) for n in sets]
        energy = energies[0] if len(energies) == 1 else torch.stack(energies).mean()
        terms = {"penalty": self.hidden_weight * energy, "energy": energy.detach()}
        if self._full_energy_due(step):
            with torch.no_grad():
                full = [self.energy(n.detach(), "hidden") for n in sets]
                terms["full_energy"] = full[0] if len(full) == 1 else torch.stack(full).mean()
        return terms

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "projection": self.projection,
            "seed": self.seed,
            "learned": {k: v.detach().cpu().clone() for k, v in self._learned.items()},
            "init_period": dict(self._init_period),
            "last_update_step": self._last_update_step,
            "drawn": {k: v.detach().cpu().clone() for k, v in self._drawn.items()},
            "drawn_period": self._drawn_period,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        saved = state_dict.get("projection", self.projection)
        if saved != self.projection:
            raise ValueError(f"the checkpoint holds CoMHERegularizer state of projection={saved!r}, this callback "
                             f"has projection={self.projection!r}")
        self.seed = int(state_dict.get("seed", self.seed))
        self._learned = {k: v.clone() for k, v in state_dict.get("learned", {}).items()}
        self._init_period = {k: int(v) for k, v in state_dict.get("init_period", {}).items()}
        last = state_dict.get("last_update_step")
        self._last_update_step = None if last is None else int(last)
        self._drawn = {k: v.clone() for k, v in state_dict.get("drawn", {}).items()}
        self._drawn_period = state_dict.get("drawn_period")
        self._prepared_step = None
