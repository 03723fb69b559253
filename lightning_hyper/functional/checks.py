"""Argument checks shared by the whole package: one message style.

Every error names the argument, the value given, the accepted values and (where there is one) the fix::

    >>> check_choice("metric", "cosine", ("euclidean", "angular"), owner="hyperspherical_energy")
    Traceback (most recent call last):
    ...
    ValueError: hyperspherical_energy: metric='cosine' is not supported; accepted values: 'euclidean', 'angular'
    >>> check_number("lr", 0, low=0, owner="OGD")
    Traceback (most recent call last):
    ...
    ValueError: OGD: lr=0 is not supported; accepted values: a finite number > 0
    >>> check_number("steps", 3, low=1, low_inclusive=True, integer=True)
    3

No Lightning, no torch modules: ``functional/``, ``nn/``, callbacks, models and data all import from here.
:func:`check_labels` is the one check of a batch's class labels (margin heads, DH2L, discrete metrics).
"""
from __future__ import annotations

import math
from typing import Any, NoReturn
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["argument_error", "check_choice", "check_fraction", "check_labels", "check_number", "check_positive_int",
           "check_positive_ints", "describe_range", "shown"]


def argument_error(name: str, value: Any, accepted: str, *, owner: str | None = None, fix: str | None = None,
                   exc: type[Exception] = ValueError) -> NoReturn:
    """Raise ``exc`` with the one message style:
    ``"<owner>: <name>=<value> is not supported; accepted values: <accepted>[. Fix: <fix>]"``."""
    prefix = f"{owner}: " if owner else ""
    message = f"{prefix}{name}={value!r} is not supported; accepted values: {accepted}"
    if fix:
        message += f". Fix: {fix}"
    raise exc(message)


def check_choice(name: str, value: Any, accepted: Sequence[Any], *, owner: str | None = None,
                 fix: str | None = None) -> Any:
    """Return ``value`` if it is one of ``accepted`` (compared with ``==``, so strings must match exactly)."""
    if isinstance(value, (str, int, float, type(None))) and any(type(value) is type(a) and value == a
                                                                for a in accepted):
        return value
    argument_error(name, value, ", ".join(repr(a) for a in accepted), owner=owner, fix=fix)


def describe_range(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool,
                   integer: bool) -> str:
    """``"a finite number > 0"``, ``"an int >= 1"``, ``"a finite number in [0, 1)"``, ..."""
    kind = "an int" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{kind} {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"{kind} {'<=' if high_inclusive else '<'} {high:g}"
    return kind


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = False, high_inclusive: bool = True, integer: bool = False,
                 allow_none: bool = False, owner: str | None = None, fix: str | None = None) -> Any:
    """Return ``value`` (an ``int`` if ``integer``, else a ``float``) if it is a finite real number in the range;
    ``bool`` is never a number here. ``low`` is exclusive unless ``low_inclusive``, ``high`` inclusive unless
    ``high_inclusive=False``. ``None`` passes through when ``allow_none``."""
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        accepted = describe_range(low, high, low_inclusive, high_inclusive, integer)
        if allow_none:
            accepted = f"None or {accepted}"
        argument_error(name, value, accepted, owner=owner, fix=fix)
    return int(value) if integer else float(value)


def check_fraction(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = False,
                   owner: str | None = None, fix: str | None = None) -> float:
    """A fraction in ``[0, 1)`` by default (``allow_zero`` / ``allow_one`` open or close the ends)."""
    return check_number(name, value, low=0.0, high=1.0, low_inclusive=allow_zero, high_inclusive=allow_one,
                        owner=owner, fix=fix)


def check_positive_int(name: str, value: Any, *, owner: str | None = None, fix: str | None = None) -> int:
    """An ``int >= 1`` (a size, a count)."""
    return check_number(name, value, low=1, low_inclusive=True, integer=True, owner=owner, fix=fix)


def check_positive_ints(name: str, values: Any, *, owner: str | None = None) -> tuple[int, ...]:
    """A non-empty sequence of ``int >= 1`` (layer widths), returned as a tuple."""
    values = tuple(values) if isinstance(values, (list, tuple)) else values
    if not isinstance(values, tuple) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        argument_error(name, values, "a non-empty sequence of ints >= 1", owner=owner)
    return values


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def shown(text: str) -> str:
    """A value that :func:`argument_error` prints as written, not quoted: ``labels=<tensor of shape (3, 2)>``."""
    return _Shown(text)


def check_labels(labels: Any, num_classes: int, *, batch_size: int | None = None, allow_column: bool = False,
                 owner: str | None = None, what: str | None = None,
                 dtype_error: type[Exception] = TypeError) -> Tensor:
    """Check a tensor of class labels: integer dtype, shape ``(batch_size,)`` (``(B,)`` of any ``B`` when
    ``batch_size`` is None; ``(B, 1)`` too with ``allow_column``), every id in ``[0, num_classes - 1]`` (one host
    sync). Returns ``labels`` (flattened with ``allow_column``). A non-integer tensor raises ``dtype_error``, a wrong
    shape or range ``ValueError``; ``what`` says what ``num_classes`` counts (e.g. "the classes the hierarchy
    covers")."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        got = f"<tensor of dtype {labels.dtype}>" if isinstance(labels, Tensor) else f"<{type(labels).__name__}>"
        argument_error("labels", shown(got), "an integer tensor of class indices", owner=owner, exc=dtype_error)
    n = "B" if batch_size is None else str(batch_size)
    ok_shape = labels.dim() == 1 or (allow_column and labels.dim() == 2 and labels.shape[1] == 1)
    if not ok_shape or (batch_size is not None and labels.shape[0] != batch_size):
        accepted = f"an integer tensor of class indices of shape ({n},)" + (f" or ({n}, 1)" if allow_column else "")
        argument_error("labels", shown(f"<tensor of shape {tuple(labels.shape)}>"), accepted, owner=owner)
    if allow_column:
        labels = labels.flatten()
    if labels.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if low < 0 or high >= num_classes:
            accepted = f"class indices in [0, {num_classes - 1}] (num_classes={num_classes}" \
                       + (f": {what})" if what else ")")
            argument_error("labels", shown(f"<class indices in range [{low}, {high}]>"), accepted, owner=owner)
    return labels
