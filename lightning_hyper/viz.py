"""Plots of hyperspherical quantities (matplotlib, Agg-safe; no pyplot state is touched).

* :func:`plot_energy`: per-layer hyperspherical energy over training steps, read from a logger's
  metrics (a CSVLogger ``metrics.csv`` / log dir, a TensorBoard event dir, an
  :class:`~lightning_hyper.callbacks.EnergyMonitor`, or plain rows); every ``<prefix>/energy/<layer>``
  metric is a curve (``monitor/`` from EnergyMonitor, ``mhe/`` from MHERegularizer, ``comhe/`` ...).
* :func:`plot_angle_histograms`: the histogram of pairwise angles ``θ_ij = arccos(ŵ_i·ŵ_j)`` of each
  layer's neurons, with the density of the angle between two independent uniform points on
  S^{d-1} (:func:`uniform_angle_density`) as the reference a minimum-energy layer approaches.
* :func:`plot_on_sphere`: neurons or features normalized onto S¹ (2-D) or S² (3-D), colored by label,
  as in the SphereFace figures (thesis Ch. 2: Fig. 2.2, 2-D MNIST features; Fig. 2.10, 3-D features).

Every function returns the :class:`matplotlib.figure.Figure`, draws into ``ax`` if given, and
saves to ``path`` (PNG, PDF, SVG... by extension) if given. Figures are built with
``matplotlib.figure.Figure`` (no global pyplot figure list), so they are safe in scripts, tests and
headless runs; in Jupyter a returned figure is displayed as the cell's value.
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ENERGY_METRIC",
    "load_energy_metrics",
    "plot_angle_histograms",
    "plot_energy",
    "plot_on_sphere",
    "uniform_angle_density",
]

#: ``<prefix>/energy/<layer>``: the name every energy-logging callback uses (DESIGN.md, contract 3)
ENERGY_METRIC = re.compile(r"^(?P<prefix>[^/]+(?:/[^/]+)*?)/energy/(?P<layer>[^/]+)$")

_TB_MARK = "events.out.tfevents"
Series = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------- helpers
def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _to_numpy(x: Any, arg: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{arg}: expected a tensor or an array of numbers, got {type(x).__name__}") from err


# --------------------------------------------------------------------------------- energy curves
def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _natural_key(name: str) -> list[Any]:
    """``"features.10"`` after ``"features.3"``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _series_from_rows(rows: Iterable[Mapping[str, Any]], what: str) -> Series:
    points: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"source: {what} must hold dicts (one per logging step), item {i} is {type(row).__name__}")
        if {"step", "layer", "energy"} <= set(row):  # EnergyMonitor.history rows
            name, value = f"{row.get('prefix', 'monitor')}/energy/{row['layer']}", _float(row["energy"])
            step = _float(row["step"])
            if value is not None and step is not None:
                points.setdefault(name, []).append((step, value))
            continue
        step = _float(row.get("step"))
        if step is None:
            step = float(i)
        for key, raw in row.items():
            if key == "step":
                continue
            value = _float(raw)
            if value is not None:
                points.setdefault(key, []).append((step, value))
    return {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in points.items()}


def _read_csv(path: Path) -> Series:
    with open(path, newline="") as fh:
        return _series_from_rows(csv.DictReader(fh), f"CSV file {str(path)!r}")


def _read_tensorboard(path: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    acc.Reload()
    out: Series = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events], dtype=np.float64),
                    np.array([e.value for e in events], dtype=np.float64))
    return out


def _find_logs(root: Path) -> list[Path]:
    """Run folders under ``root`` holding a ``metrics.csv`` or TensorBoard event files."""
    found = set()
    for p in root.rglob("*"):
        if p.is_file() and (p.name == "metrics.csv" or p.name.startswith(_TB_MARK)):
            found.add(p if p.name == "metrics.csv" else p.parent)
    return sorted(found)


def _read_path(path: Path) -> Series:
    if not path.exists():
        raise ValueError(f"source: {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".csv":
            return _read_csv(path)
        if path.name.startswith(_TB_MARK):
            return _read_tensorboard(path)
        raise ValueError(f"source: {str(path)!r} is neither a CSV file (metrics.csv) nor a TensorBoard event file "
                         f"({_TB_MARK}.*)")
    if (path / "metrics.csv").is_file():
        return _read_csv(path / "metrics.csv")
    if any(p.name.startswith(_TB_MARK) for p in path.iterdir()):
        return _read_tensorboard(path)
    runs = _find_logs(path)
    if len(runs) == 1:
        return _read_path(runs[0])
    if not runs:
        raise ValueError(f"source: no metrics.csv or TensorBoard event file ({_TB_MARK}.*) under {str(path)!r}")
    raise ValueError(f"source: {str(path)!r} holds {len(runs)} runs; pass one of them: "
                     + ", ".join(str(r) for r in runs[:10]))


def load_energy_metrics(source: Any, prefix: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-layer energy series ``{metric name: (steps, values)}`` from a logger's metrics.

    Args:
        source: one of
            - a CSVLogger ``metrics.csv`` file or its log dir (``trainer.logger.log_dir``), or a folder
              holding exactly one run;
            - a TensorBoard event file or event dir (read with tensorboard's ``EventAccumulator``);
            - an :class:`~lightning_hyper.callbacks.EnergyMonitor` (its ``history``);
            - a list of row dicts ``{"step": ..., "<prefix>/energy/<layer>": ...}`` (CSV-like) or
              ``{"step", "layer", "energy"}`` (``EnergyMonitor.history``);
            - a dict of columns ``{"step": [...], name: [...]}`` (``None``/NaN = not logged) or of
              ``{name: [(step, value), ...]}``.
        prefix: keep only ``<prefix>/energy/*`` (e.g. ``"monitor"``, ``"mhe"``, ``"comhe"``).

    Returns:
        only the metrics named ``<prefix>/energy/<layer>``, each sorted by step.

    Raises:
        ValueError: no such metric in ``source`` (the message lists the metrics that are there), a
            path that does not exist or holds no / several runs.
        TypeError: an unsupported ``source`` type.
    """
    if hasattr(source, "history") and hasattr(source, "prefix"):  # an EnergyMonitor
        rows = [{**r, "prefix": source.prefix} for r in source.history]
        series, what = _series_from_rows(rows, "EnergyMonitor.history"), f"{type(source).__name__}.history"
    elif isinstance(source, (str, os.PathLike)):
        series, what = _read_path(Path(source)), repr(str(source))
    elif isinstance(source, Mapping):
        if "step" in source:
            steps = list(source["step"])
            cols = {k: list(v) for k, v in source.items() if k != "step"}
            bad = [k for k, v in cols.items() if len(v) != len(steps)]
            if bad:
                raise ValueError(f"source: columns {bad} do not have len(source['step']) = {len(steps)} values")
            rows = [{"step": s, **{k: v[i] for k, v in cols.items()}} for i, s in enumerate(steps)]
            series = _series_from_rows(rows, "a dict of columns")
        else:
            rows = []
            for name, pairs in source.items():
                try:
                    rows += [{"step": s, name: v} for s, v in pairs]
                except (TypeError, ValueError) as err:
                    raise TypeError(f"source[{name!r}]: expected a list of (step, value) pairs (or pass a 'step' "
                                    "column)") from err
            series = _series_from_rows(rows, "a dict of (step, value) lists")
        what = "the given dict"
    elif isinstance(source, Sequence):
        series, what = _series_from_rows(source, "a list of rows"), "the given rows"
    else:
        raise TypeError("source: expected a metrics.csv / log dir / TensorBoard dir path, an EnergyMonitor, a list "
                        f"of row dicts or a dict of columns, got {type(source).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a string such as 'monitor' or 'mhe', or None, got {prefix!r}")
    energy = {}
    for name, (steps, values) in series.items():
        match = ENERGY_METRIC.match(name)
        if match and (prefix is None or match["prefix"] == prefix):
            order = np.argsort(steps, kind="stable")
            energy[name] = (steps[order], values[order])
    if not energy:
        want = f"'{prefix}/energy/<layer>'" if prefix else "'<prefix>/energy/<layer>'"
        present = sorted(series)
        raise ValueError(f"source: no {want} metric in {what}; metrics present: "
                         f"{present[:20]}{' ...' if len(present) > 20 else ''}. Log them with EnergyMonitor, "
                         "MHERegularizer or CoMHERegularizer (and a logger)")
    return dict(sorted(energy.items(), key=lambda item: _natural_key(item[0])))


def plot_energy(source: Any, *, prefix: str | None = None, layers: Sequence[str] | None = None,
                relative: bool = False, logy: bool = False, ax: Axes | None = None,
                path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """Per-layer hyperspherical energy against the training step, one curve per layer.

    The curves are the mean pairwise energies ``Ē = 2/(N(N-1)) Σ_{i<j} f(‖ŵ_i − ŵ_j‖)`` the callbacks
    log (thesis Ch. 5, Eq. 5.1); lower means neurons spread more uniformly on the sphere.

    Args:
        source: see :func:`load_energy_metrics` (log dir, ``metrics.csv``, TensorBoard dir,
            EnergyMonitor, rows or columns).
        prefix: only this callback's metrics (``"monitor"``, ``"mhe"``, ...); default all.
        layers: only these layer names.
        relative: divide every curve by its first value (energy relative to the start).
        logy: logarithmic y axis.
        ax: axes to draw into (default: a new figure).
        path: save the figure there.
        title: axes title.
    """
    series = load_energy_metrics(source, prefix=prefix)
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        keep = {n: s for n, s in series.items() if ENERGY_METRIC.match(n)["layer"] in layers}
        if not keep:
            raise ValueError(f"layers: none of {list(layers)} is logged; layers present: "
                             f"{sorted({ENERGY_METRIC.match(n)['layer'] for n in series})}")
        series = keep
    prefixes = {ENERGY_METRIC.match(n)["prefix"] for n in series}
    fig = _new_figure((6.4, 4.0)) if ax is None else ax.figure
    if ax is None:
        ax = fig.add_subplot()
    for name, (steps, values) in series.items():
        m = ENERGY_METRIC.match(name)
        label = m["layer"] if len(prefixes) == 1 else f"{m['layer']} ({m['prefix']})"
        y = values / values[0] if relative and values[0] != 0 else values
        ax.plot(steps, y, marker="o" if len(steps) < 15 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("energy / initial energy" if relative else "mean pairwise energy")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title if title is not None else "hyperspherical energy per layer")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncol=2 if len(series) > 12 else 1)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


# ------------------------------------------------------------------------------- angle histograms
def uniform_angle_density(theta: Any, dim: int, degrees: bool = False) -> np.ndarray:
    """Density of the angle θ between two independent uniform points on S^{dim-1} ⊂ R^dim.

    ``p(θ) = sin^{dim-2}(θ) / ∫_0^π sin^{dim-2} = Γ(dim/2) / (√π Γ((dim-1)/2)) · sin^{dim-2}(θ)``,
    θ ∈ [0, π]; uniform ``1/π`` on the circle (dim = 2), ``sin(θ)/2`` on S² (dim = 3), concentrating
    at π/2 as dim grows. This is what pairwise neuron angles approach when a layer's neurons are
    uniformly spread (the MHE objective, thesis Ch. 5). With ``degrees`` θ is in degrees and the
    density is per degree.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
        raise ValueError(f"dim={dim!r} is not supported; accepted values: an int >= 2 (the neuron dimension)")
    t = _to_numpy(theta, "theta")
    rad = np.deg2rad(t) if degrees else t
    log_norm = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    inside = (rad >= 0) & (rad <= math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        sin = np.clip(np.sin(np.where(inside, rad, 0.5)), 0.0, None)
        dens = np.exp(log_norm) * np.ones_like(sin) if dim == 2 else np.exp(log_norm + (dim - 2) * np.log(sin))
    dens = np.where(inside, dens, 0.0)
    return dens * (math.pi / 180.0) if degrees else dens


def _named_neurons(source: Any, include: Any, exclude: Any, layer_types: Any,
                   output_layer: str | None) -> list[tuple[str, Tensor]]:
    from lightning_hyper.functional.neurons import as_neurons

    if isinstance(source, nn.Module):
        from lightning_hyper.nn.selection import select_neurons

        out = []
        for g in select_neurons(source, include=include, exclude=exclude, layer_types=layer_types,
                                output_layer=output_layer):
            n = g.neurons().detach()
            out += [(f"{g.name}[{i}]", part) for i, part in enumerate(n)] if n.dim() == 3 else [(g.name, n)]
        return out
    if any(v is not None for v in (include, exclude, layer_types, output_layer)):
        raise ValueError("include / exclude / layer_types / output_layer select layers of an nn.Module; "
                         f"they do not apply to a {type(source).__name__}")
    if isinstance(source, Mapping):
        out = []
        for name, w in source.items():
            if not isinstance(w, (Tensor, nn.Module, np.ndarray)):
                raise TypeError(
                    f"source[{name!r}]: expected a weight tensor / array or a layer, got {type(w).__name__}"
                )
            w = torch.as_tensor(w) if isinstance(w, np.ndarray) else w
            out.append((str(name), as_neurons(w).detach()))
        return out
    if isinstance(source, (Tensor, np.ndarray)):
        return [("neurons", as_neurons(torch.as_tensor(source)).detach())]
    raise TypeError("model: expected an nn.Module, a dict {layer name: weight} or a weight tensor (N, d), "
                    f"got {type(source).__name__}")


def plot_angle_histograms(model: Any, *, include: str | Sequence[str] | None = None,
                          exclude: str | Sequence[str] | None = None,
                          layer_types: str | Sequence[str] | None = None, output_layer: str | None = None,
                          bins: int = 36, degrees: bool = True, reference: bool = True, ncols: int = 3,
                          ax: Axes | Sequence[Axes] | None = None, path: str | os.PathLike | None = None,
                          title: str | None = None) -> Figure:
    """Histogram (density) of the pairwise angles between the neurons of each layer.

    Angles come from :func:`lightning_hyper.functional.energy.pairwise_angles` (all pairs i < j of
    ``as_neurons(weight)``'s rows). With ``reference`` the uniform-on-the-sphere density
    :func:`uniform_angle_density` for the layer's neuron dimension d is drawn over it.

    Args:
        model: an ``nn.Module`` (layers found with :func:`~lightning_hyper.nn.select_neurons`, as the
            callbacks do; a grouped convolution gives one entry per channel group, ``<name>[g]``), a dict
            ``{name: weight or layer}``, or one weight tensor.
        include, exclude, layer_types, output_layer: layer selection of a module (see ``select_neurons``).
        bins: histogram bins over [0°, 180°] (or [0, π]).
        degrees: angles in degrees (else radians).
        reference: draw the uniform-on-sphere density.
        ncols: panels per row of a new figure.
        ax: one axes (a single layer) or one axes per layer; default: a new grid figure.
        path: save the figure there.
        title: figure title.
    """
    from lightning_hyper.functional.energy import pairwise_angles

    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} is not supported; accepted values: an int >= 1")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols={ncols!r} is not supported; accepted values: an int >= 1")
    layers = [(n, w) for n, w in _named_neurons(model, include, exclude, layer_types, output_layer)
              if w.shape[0] >= 2]
    if not layers:
        raise ValueError("model: no selected layer has >= 2 neurons, so there is no pair to measure")
    if ax is None:
        rows = math.ceil(len(layers) / ncols)
        cols = min(ncols, len(layers))
        fig = _new_figure((3.4 * cols, 2.6 * rows))
        grid = fig.subplots(rows, cols, squeeze=False).ravel()
        for extra in grid[len(layers):]:
            extra.set_visible(False)
        axes = list(grid[:len(layers)])
    else:
        axes = list(ax) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
        if len(axes) != len(layers):
            raise ValueError(f"ax: got {len(axes)} axes for {len(layers)} layers "
                             f"({[n for n, _ in layers]}); pass one axes per layer or none")
        fig = axes[0].figure
    top = 180.0 if degrees else math.pi
    for a, (name, neurons) in zip(axes, layers):
        angles = pairwise_angles(neurons.double(), degrees=degrees).cpu().numpy()
        a.hist(angles, bins=bins, range=(0.0, top), density=True, color="tab:blue", alpha=0.75,
               label="neurons")
        if reference:
            grid_t = np.linspace(0.0, top, 361)
            a.plot(grid_t, uniform_angle_density(grid_t, neurons.shape[1], degrees=degrees), color="tab:red",
                   lw=1.5, label=f"uniform on $S^{{{neurons.shape[1] - 1}}}$")
        a.set_title(f"{name}  (N={neurons.shape[0]}, d={neurons.shape[1]})", fontsize="small")
        a.set_xlabel("angle (degrees)" if degrees else "angle (radians)")
        a.set_xlim(0.0, top)
        a.set_ylabel("density")
    axes[0].legend(fontsize="x-small")
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, path)


# --------------------------------------------------------------------------------- points on S^1/2
def plot_on_sphere(points: Any, labels: Any = None, *, weights: Any = None, normalize: bool = True,
                   ax: Axes | None = None, path: str | os.PathLike | None = None, title: str | None = None,
                   point_size: float = 8.0, legend: bool = True) -> Figure:
    """Scatter 2-D points on the unit circle S¹ or 3-D points on the unit sphere S², colored by label.

    ``x̂ = x / ‖x‖`` for every row (SphereFace, thesis Ch. 2: A-Softmax features are compared by angle
    only, so their directions on the sphere are what the margin separates).

    Args:
        points: ``(N, 2)`` or ``(N, 3)`` features (tensor / array), or a layer whose neurons
            (``as_neurons``) are 2- or 3-dimensional.
        labels: ``(N,)`` integer labels for colors (optional).
        weights: optional ``(K, d)`` class weights / neurons drawn as arrows from the origin (e.g. the
            A-Softmax head's ``weight``), normalized like the points.
        normalize: project the points onto the sphere (else plot them as they are, with the unit
            circle / sphere for reference).
        ax: axes to draw into (must be a 3-D axes, ``projection="3d"``, for 3-D points).
        path: save the figure there.
        title: axes title.
        point_size: marker size.
        legend: show a legend of the labels (at most 20 distinct labels).
    """
    if isinstance(points, nn.Module):
        from lightning_hyper.functional.neurons import as_neurons

        points = as_neurons(points)
    x = _to_numpy(points, "points")
    if x.ndim != 2 or x.shape[1] not in (2, 3) or x.shape[0] < 1:
        raise ValueError(f"points: expected shape (N, 2) for S^1 or (N, 3) for S^2, got {tuple(x.shape)}; "
                         "use a 2- or 3-dimensional embedding")
    d = x.shape[1]
    y = None
    if labels is not None:
        y = _to_numpy(labels, "labels").reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"labels: expected {x.shape[0]} labels (one per point), got {y.shape[0]}")

    def unit(v: np.ndarray, arg: str) -> np.ndarray:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if (norms <= 1e-12).any():
            raise ValueError(f"{arg}: rows {np.flatnonzero(norms[:, 0] <= 1e-12)[:10].tolist()} have zero norm "
                             "and no direction on the sphere")
        return v / norms

    x = unit(x, "points") if normalize else x
    w = None
    if weights is not None:
        if isinstance(weights, nn.Module):
            from lightning_hyper.functional.neurons import as_neurons

            weights = as_neurons(weights)
        w = _to_numpy(weights, "weights")
        if w.ndim != 2 or w.shape[1] != d:
            raise ValueError(f"weights: expected shape (K, {d}) like the points, got {tuple(w.shape)}")
        w = unit(w, "weights")
    if ax is None:
        fig = _new_figure((4.8, 4.8) if d == 2 else (5.6, 5.2))
        ax = fig.add_subplot(projection="3d" if d == 3 else None)
    else:
        fig = ax.figure
        if (getattr(ax, "name", "") == "3d") != (d == 3):
            raise TypeError("ax: 3-D points need a 3-D axes (fig.add_subplot(projection='3d')) and 2-D points a "
                            f"2-D axes; got a {getattr(ax, 'name', type(ax).__name__)!r} axes for {d}-D points")
    t = np.linspace(0.0, 2 * math.pi, 200)
    if d == 2:
        ax.plot(np.cos(t), np.sin(t), color="0.6", lw=1.0, zorder=0)
    else:
        u, v = np.meshgrid(np.linspace(0, 2 * math.pi, 30), np.linspace(0, math.pi, 16))
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.8", lw=0.4)
    coords = [x[:, i] for i in range(d)]
    if y is None:
        ax.scatter(*coords, s=point_size, color="tab:blue")
    else:
        classes = np.unique(y)
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"]
        for k, c in enumerate(classes):
            sel = y == c
            color = cmap(k % cmap.N) if len(classes) <= 20 else cmap(k / max(1, len(classes) - 1))
            label = str(int(c)) if float(c).is_integer() else str(c)
            ax.scatter(*[coord[sel] for coord in coords], s=point_size, color=color, label=label)
        if legend and len(classes) <= 20:
            ax.legend(fontsize="x-small", markerscale=2, loc="upper right", title="label", title_fontsize="x-small")
    if w is not None:
        for row in w:
            ax.plot(*[[0.0, float(c)] for c in row], color="black", lw=1.5)
    lim = 1.1 if normalize else max(1.1, float(np.abs(x).max()) * 1.05)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    if d == 3:
        ax.set_zlim(-lim, lim)
        ax.set_box_aspect((1, 1, 1))
    else:
        ax.set_aspect("equal")
    if d == 3:
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
        ax.set_zticks([-1, 0, 1])
    ax.set_title(title if title is not None else f"{'points on ' if normalize else ''}$S^{d - 1}$")
    return _finish(fig, path)
