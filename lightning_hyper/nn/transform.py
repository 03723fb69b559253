"""What the model transforms :func:`~lightning_hyper.nn.opt.apply_opt` and :func:`~lightning_hyper.nn.convert.convert`
share.

Both take their layers from :func:`~lightning_hyper.nn.selection.select_neurons` (DESIGN.md, contract 1);
this module only adds what a *transform* needs on top of the core's groups: the mapping of the old
argument names, the output layer left plain, the groups a transform cannot handle (with a reason), and
the model's parameter ties and module slots (a transform must keep both). It selects nothing itself.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from lightning_hyper.nn.selection import NeuronGroup, SkippedLayer, select_neurons, selection_table

#: default of a deprecated argument that was not passed
UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()

#: skip reasons that mean "this transform cannot handle the layer" (warned once per call)
CANNOT = "cannot transform: "
#: the output layer, left plain by default
OUTPUT_REASON = "output layer (left plain; output_layer='none' transforms it too)"


@dataclass
class TransformPlan:
    """What a transform will change: ``groups`` (one per module / weight, core names and order) and
    ``skipped`` (``(name, reason)`` rows: the core's reasons, the output layer, and what the transform
    cannot handle)."""

    groups: list[NeuronGroup]
    skipped: list[SkippedLayer]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def table(self) -> str:
        """The plan as :func:`~lightning_hyper.nn.selection.selection_table` prints it."""
        return selection_table(self.groups, self.skipped)


def deprecated(fn: str, old: str, new: str, value: Any, stacklevel: int = 3) -> None:
    warnings.warn(f"{fn}({old}={value!r}) is deprecated; use {new} (the argument names shared with select_neurons "
                  "and the callbacks). The old name will be removed in a future release.",
                  DeprecationWarning, stacklevel=stacklevel)


def conflict(fn: str, old: str, new: str) -> ValueError:
    return ValueError(f"{fn}: {old}= (deprecated) and {new}= were both given; pass only {new}=")


def output_layer_from_flag(fn: str, old: str, value: Any, output_layer: str | None, new: str) -> str | None:
    """The ``output_layer`` a deprecated boolean flag (``exclude_output`` / ``keep_classifier``) means:
    ``True`` keeps the detected output layer plain (``None``), ``False`` transforms it too (``"none"``)."""
    deprecated(fn, old, new, value, stacklevel=4)
    if output_layer is not None:
        raise conflict(fn, old, "output_layer")
    if not isinstance(value, bool):
        raise TypeError(f"{old}={value!r} is not supported: expected True or False (or use output_layer=)")
    return None if value else "none"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [v for v in value if isinstance(v, str)]
    except TypeError:
        return []


def _holds_weight(module: nn.Module) -> bool:
    return any(n.startswith("weight") and isinstance(p, Tensor) and p.dim() >= 2
               for n, p in module.named_parameters(recurse=False))


def _reword_pattern_error(fn: str, model: nn.Module, include: Any, exclude: Any, err: ValueError,
                          supported: str) -> None:
    """The core refused an ``include``/``exclude`` pattern: say whether it names no module at all, or a
    module this transform cannot convert (TypeError), in the transform's own words. Returns if neither."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    all_names = [n for n, _ in modules]
    more = " ..." if len(all_names) > 20 else ""
    for arg, patterns in (("include", _patterns(include)), ("exclude", _patterns(exclude))):
        for p in patterns:
            if f"pattern {p!r}" not in str(err):
                continue
            hits = [(n, m) for n, m in modules if fnmatch.fnmatchcase(n, p)]
            if not hits:
                raise ValueError(f"{fn}: {arg}={p!r} matches no module of {type(model).__name__}; modules: "
                                 f"{all_names[:20]}{more}. Fix: pass module-name globs such as 'layer1.*'") from None
            weighted = [(n, m) for n, m in hits if _holds_weight(m)]
            if arg == "include" and weighted:
                n, m = weighted[0]
                raise TypeError(f"{fn}: include={p!r} selects {n!r} of type {type(m).__name__}, which {fn} cannot "
                                f"convert; supported layers: {supported}. Fix: leave it out of include") from None


@dataclass
class TransformArgs:
    include: Any
    exclude: Any
    layer_types: Any
    output_layer: Any
    trainable_only: bool
    example_input: Any


def plan_transform(fn: str, model: nn.Module, args: TransformArgs, cannot: Callable[[NeuronGroup], str | None],
                   supported: str) -> TransformPlan:
    """Groups of ``select_neurons(model, ...)`` that ``fn`` will transform.

    ``cannot(group)`` returns why ``fn`` cannot transform a group (or ``None``). The output group is left
    plain. An ``include`` pattern that selects only groups ``fn`` cannot transform is a ``TypeError``; a lazy
    layer that the patterns do not leave out is a ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        groups, skipped = select_neurons(model, args.include, args.exclude, args.layer_types, args.output_layer,
                                         args.trainable_only, args.example_input, return_skipped=True)
    except ValueError as err:
        _reword_pattern_error(fn, model, args.include, args.exclude, err, supported)
        raise
    includes, excludes = _patterns(args.include), _patterns(args.exclude)
    for s in skipped:
        wanted = not _matches(s.name, excludes) and (not includes or _matches(s.name, includes))
        if s.reason.startswith("lazy") and wanted:
            raise ValueError(f"{fn}: layer {s.name!r} is lazy (its weight is not initialized yet); run one forward "
                             f"pass, or pass example_input=... (one batch) to {fn}, before transforming the model")
    chosen: list[NeuronGroup] = []
    skipped = list(skipped)
    cannot_rows: list[SkippedLayer] = []
    for g in groups:
        if g.role == "output":
            skipped.append(SkippedLayer(g.name, OUTPUT_REASON))
            continue
        why = cannot(g)
        if why:
            row = SkippedLayer(g.name, why)
            skipped.append(row)
            if why.startswith(CANNOT):
                cannot_rows.append(row)
            continue
        chosen.append(g)
    for p in includes:
        hits = [g for g in groups if fnmatch.fnmatchcase(g.name, p) or fnmatch.fnmatchcase(g.module_name, p)]
        if hits and not any(g in chosen for g in hits):
            reasons = {s.name: s.reason for s in skipped}
            if all(reasons.get(g.name, "").startswith(CANNOT) for g in hits):
                g = hits[0]
                raise TypeError(f"{fn}: include={p!r} selects {g.name!r} of type {type(g.module).__name__}, which "
                                f"{fn} cannot convert ({reasons[g.name][len(CANNOT):]}); supported layers: "
                                f"{supported}. Fix: leave it out of include")
            if all(g.role == "output" for g in hits):
                raise ValueError(f"{fn}: include={p!r} selects only the output layer {hits[0].name!r}, which {fn} "
                                 "leaves plain. Fix: pass output_layer='none' to transform every selected layer "
                                 "(or output_layer='<other name>' if the detected output layer is wrong)")
    if cannot_rows:
        by_reason: dict[str, list[str]] = {}
        for r in cannot_rows:
            by_reason.setdefault(r.reason[len(CANNOT):], []).append(repr(r.name))
        items = list(by_reason.items())
        listed = "; ".join(f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''} ({why})"
                           for why, names in items[:6])
        more = f"; ... (+{len(items) - 6} more reasons)" if len(items) > 6 else ""
        warnings.warn(f"{fn}: {len(cannot_rows)} layer(s) with neurons stay plain because {fn} cannot transform "
                      f"them: {listed}{more}. Supported: {supported}", UserWarning, stacklevel=4)
    detect = args.output_layer is None and getattr(model, "output_layer_name", None) is None
    if detect and args.example_input is None and not any(g.role == "output" for g in groups):
        if not any(isinstance(m, nn.Linear) or type(m).__name__ == "Linear" for m in model.modules()) and chosen:
            warnings.warn(f"{fn}: no output layer found in {type(model).__name__} (it has no Linear layer and no "
                          "example_input was given), so every selected layer is transformed, a convolutional "
                          "classifier (e.g. SqueezeNet's) included. Fix: pass example_input=<one batch> (the output "
                          "layer is then the last layer the forward pass runs), output_layer='<name>', or "
                          "output_layer='none' to silence this", UserWarning, stacklevel=4)
    return TransformPlan(chosen, skipped)


def nothing_selected(fn: str, model: nn.Module, plan: TransformPlan, what: str) -> ValueError:
    table = plan.table()
    hint = ("" if not any(s.reason == OUTPUT_REASON for s in plan.skipped)
            else " The output layer is left plain: pass output_layer='none' to transform it.")
    return ValueError(f"{fn} found no {what} to transform in {type(model).__name__} (check include / exclude / "
                      f"layer_types / output_layer / trainable_only).{hint}\nSelection:\n{table}")


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``{id(parameter): [(module name, module, attribute), ...]}`` over every registration of every module."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((name, module, pname))
    return owners


def foreign_owners(owners: dict[int, list[tuple[str, nn.Module, str]]], module: nn.Module,
                   pname: str = "weight") -> list[str]:
    """Other modules (not ``module`` itself, under any name) that hold ``module.<pname>``."""
    p = module._parameters.get(pname)
    if p is None:
        return []
    seen, out = set(), []
    for name, m, attr in owners.get(id(p), []):
        if m is module:
            continue
        label = f"{name}.{attr}" if name else attr
        if label not in seen:
            seen.add(label)
            out.append(label)
    return out


def module_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """``{id(module): [(parent, attribute, full name), ...]}``: every place a module is registered."""
    slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, attr, f"{pname}.{attr}" if pname else attr))
    # a module reached along several paths is listed once per (parent, attribute)
    for key, rows in slots.items():
        unique, seen = [], set()
        for parent, attr, name in rows:
            if (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                unique.append((parent, attr, name))
        slots[key] = unique
    return slots
