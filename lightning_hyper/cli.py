"""Command line: ``lightning-hyper fit --config configs/digits_mhe.yaml`` (or ``python -m lightning_hyper``).

A ``LightningCLI`` in subclass mode for both the model and the data, so configs name them by
``class_path`` (any LightningModule / LightningDataModule, including the user's own) and short
class names such as ``--model HypersphericalClassifier`` resolve, because this module imports
``lightning_hyper.models``, ``lightning_hyper.data`` and ``lightning_hyper.callbacks``. After
``fit``/``validate``/``test`` a short summary of the final metrics (accuracy, loss and every
logged energy/penalty of ``trainer.callback_metrics``) is printed to stdout.

* ``lightning-hyper --help`` (and ``fit --help``) lists the library's models, callbacks and data
  modules by short name (:func:`catalog`).
* Progress: Lightning's TQDM bar is on unless a config turns it off; ``--rich`` (or
  ``--trainer.callbacks+=RichProgressBar``) uses ``RichProgressBar`` instead (``--rich`` also turns
  the bar back on).
* ``lightning-hyper energy CHECKPOINT [--s S] [--metric M] [--half-space] [--format table|csv|json]``
  prints the per-layer hyperspherical energy of a saved model (:func:`checkpoint_energies`), outside
  LightningCLI's subcommands.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import io
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jsonargparse import ActionYesNo, DefaultHelpFormatter
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

import lightning_hyper.callbacks  # noqa: F401  (registers callback classes for short names)
import lightning_hyper.data  # noqa: F401
import lightning_hyper.models  # noqa: F401
from lightning_hyper.functional.energy import METRICS, hyperspherical_energy
from lightning_hyper.functional.neurons import as_neurons

__all__ = ["HyperCLI", "catalog", "checkpoint_energies", "energy_main", "format_energies", "format_metrics", "main",
           "run_cli"]

ENERGY_FORMATS = ("table", "csv", "json")

_HEADLINE = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc_epoch", "train/loss_epoch")
_EXTRA_WORDS = ("energy", "penalty", "mhe")


def format_metrics(metrics: Mapping[str, Any], title: str = "final metrics") -> str:
    """Render accuracy/loss headline metrics, then every energy/penalty metric, one per line."""
    def value(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu()
            v = v.item() if v.numel() == 1 else v.tolist()
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = [k for k in _HEADLINE if k in metrics]
    keys += sorted(k for k in metrics if k not in keys and any(w in k.lower() for w in _EXTRA_WORDS))
    if not keys:
        return f"{title}: (none logged)"
    width = max(len(k) for k in keys)
    return "\n".join([f"{title}:"] + [f"  {k:<{width}}  {value(metrics[k])}" for k in keys])


def catalog() -> dict[str, list[str]]:
    """Short names of the library's public LightningModules, Callbacks and LightningDataModules.

    Read from ``lightning_hyper.{models,callbacks,data}.__all__``, keeping the classes that subclass
    ``LightningModule`` / ``Callback`` / ``LightningDataModule`` (abstract base classes left out).
    """
    groups = {"Models": (lightning_hyper.models, LightningModule), "Callbacks": (lightning_hyper.callbacks, Callback),
              "Data": (lightning_hyper.data, LightningDataModule)}
    out: dict[str, list[str]] = {}
    for title, (package, base) in groups.items():
        objs = [getattr(package, name) for name in package.__all__]
        out[title] = sorted(o.__name__ for o in objs
                            if inspect.isclass(o) and issubclass(o, base) and not inspect.isabstract(o))
    return out


def _epilog() -> str:
    lines = ["short names usable as --model NAME, --data NAME, --trainer.callbacks+=NAME (or class_path: NAME):"]
    for title, names in catalog().items():
        lines.append(textwrap.fill(f"{title}: " + ", ".join(names), width=100, initial_indent="  ",
                                   subsequent_indent="    ", break_long_words=False, break_on_hyphens=False))
    lines += ["other commands:",
              "  lightning-hyper energy CHECKPOINT [--s S] [--metric M] [--half-space] [--format table|csv|json]",
              "      per-layer hyperspherical energy of a saved model (lightning-hyper energy --help)",
              "progress bar: Lightning's TQDM bar by default; --rich (after the subcommand) uses RichProgressBar"]
    return "\n".join(lines)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter that keeps the line breaks of the description and epilog."""


def _parser_kwargs() -> dict[str, Any]:
    epilog = _epilog()
    main = {"description": "lightning_hyper: deep hyperspherical learning on PyTorch Lightning "
                           "(MHE, CoMHE, SphereNet, DCNet, SphereFace, OPT, DH2L)",
            "epilog": epilog, "formatter_class": _HelpFormatter}
    for sub in LightningCLI.subcommands():
        main[sub] = {"epilog": epilog, "formatter_class": _HelpFormatter}
    return main


class HyperCLI(LightningCLI):
    """``LightningCLI`` that prints a summary of ``trainer.callback_metrics`` after each subcommand,
    lists the library's classes in ``--help`` and adds ``--rich`` (``RichProgressBar``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--rich", action=ActionYesNo, default=False,
                            help="Show Lightning's RichProgressBar instead of the TQDM bar (turns the bar on).")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """``--rich``: replace any progress bar by ``RichProgressBar`` (and turn the bar on). Otherwise,
        if the bar is on and no bar callback is configured, pin Lightning's ``TQDMProgressBar`` (Lightning
        itself would pick ``RichProgressBar`` whenever ``rich`` is installed)."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer_init = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_init.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("rich", False):
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)] + [RichProgressBar()]
            kwargs = {"callbacks": callbacks, "enable_progress_bar": True, **kwargs}
        elif trainer_init.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                               for c in callbacks):
            kwargs = {"callbacks": [*callbacks, TQDMProgressBar()], **kwargs}
        return super().instantiate_trainer(**kwargs)

    def _print_summary(self, subcommand: str) -> None:
        if self.trainer.is_global_zero:
            print(format_metrics(self.trainer.callback_metrics, title=f"{subcommand}: final metrics"), flush=True)

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")


def run_cli(args: list[str] | None = None, run: bool = True) -> HyperCLI:
    """Build (and by default run) the CLI on ``args`` (``None``: ``sys.argv``); returns it."""
    return HyperCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=_parser_kwargs(),
        args=args,
        run=run,
    )


# ------------------------------------------------------------------------------------------ energy
def _load_checkpoint(path: str) -> Any:
    """``torch.load`` on CPU; tensors-only unpickling first, full unpickling (arbitrary code: only for
    files you trust, as with ``Trainer.fit(ckpt_path=...)``) when the checkpoint holds other objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (hyper_parameters may hold objects the safe unpickler refuses)
        return torch.load(path, map_location="cpu", weights_only=False)


def _import(class_path: str) -> type:
    if "." not in class_path:  # a short name of the library
        for package in (lightning_hyper.models, lightning_hyper.nn):
            if hasattr(package, class_path):
                return getattr(package, class_path)
        raise ValueError(f"--model: {class_path!r} is not a class of lightning_hyper.models; give a full class path")
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _rebuild(state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any], class_path: str | None) -> nn.Module | None:
    """The saved module, rebuilt from its class and ``hyper_parameters`` with its ``state_dict`` loaded
    strictly; ``None`` if no candidate class fits. Candidates: ``class_path``, else the checkpoint's
    ``_class_path`` (LightningCLI runs), else every LightningModule of ``lightning_hyper.models``."""
    path = class_path or hparams.get("_class_path")
    if path:
        candidates = [_import(path)]
    else:
        models = [getattr(lightning_hyper.models, n) for n in lightning_hyper.models.__all__]
        candidates = [c for c in models if inspect.isclass(c) and issubclass(c, LightningModule)]
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    for cls in candidates:
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError:
            continue
        try:
            module = cls(**kwargs)
            module.load_state_dict(state, strict=True)
        except Exception:  # noqa: BLE001  (not this class: try the next one)
            continue
        return module.eval()
    return None


def checkpoint_energies(path: str, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                        class_path: str | None = None) -> dict[str, Any]:
    r"""Per-layer hyperspherical energy of a saved model (thesis Eq. 5.1, mean over ordered pairs).

    ``path`` is a Lightning checkpoint (``state_dict`` + ``hyper_parameters``), a plain
    ``state_dict`` or a pickled ``nn.Module``. A Lightning checkpoint of a library module is rebuilt
    (class from ``class_path``, the checkpoint's ``_class_path`` or a search over
    ``lightning_hyper.models``) so that layers are the ones the callbacks see (``LayerSelection``,
    effective weights of parametrized layers such as OPT, roles hidden/output). Otherwise every
    tensor with at least 2 dimensions whose key ends with ``weight`` is read as neurons by
    ``as_neurons`` (role ``"-"``). Energies come from ``hyperspherical_energy`` in float64
    (zero-norm rows left out).

    Returns:
        ``{"checkpoint", "source", "s", "metric", "half_space", "layers": [{"layer", "role",
        "neurons", "dim", "energy"}, ...]}``; ``source`` is ``"module:<class path>"`` or ``"state_dict"``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; accepted values: {list(METRICS)}")
    obj = _load_checkpoint(path)
    module: nn.Module | None = obj if isinstance(obj, nn.Module) else None
    state: Mapping[str, Any] | None = None
    if module is None:
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            state = obj["state_dict"]
            hparams = obj.get("hyper_parameters") or {}
            module = _rebuild(state, hparams if isinstance(hparams, Mapping) else {}, class_path)
        elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
            if class_path is not None:
                module = _rebuild(state, {}, class_path)
        else:
            raise ValueError(f"{path}: not a Lightning checkpoint, a state_dict or an nn.Module "
                             f"(got {type(obj).__name__})")
    rows: list[tuple[str, str, torch.Tensor]] = []
    if module is not None:
        from lightning_hyper.callbacks.base import LayerSelection

        source = f"module:{type(module).__module__}.{type(module).__qualname__}"
        rows = [(ref.name, ref.role, ref.neurons().detach()) for ref in LayerSelection().resolve(module)]
    else:
        source = "state_dict"
        assert state is not None
        rows = [(k[: -len(".weight")] if k.endswith(".weight") else k, "-", as_neurons(v.detach()))
                for k, v in state.items()
                if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.is_floating_point()]
    if not rows:
        raise ValueError(f"{path}: no layer with neurons (no floating-point tensor of 2+ dimensions whose key "
                         "ends with 'weight')")
    layers = []
    for name, role, neurons in rows:
        e = hyperspherical_energy(neurons.double(), s=s, metric=metric, half_space=half_space, zero_norm="exclude")
        layers.append({"layer": name, "role": role, "neurons": int(neurons.shape[0]), "dim": int(neurons.shape[1]),
                       "energy": float(e)})
    return {"checkpoint": str(path), "source": source, "s": float(s), "metric": metric, "half_space": half_space,
            "layers": layers}


def format_energies(result: Mapping[str, Any], fmt: str = "table") -> str:
    """Render :func:`checkpoint_energies` as an aligned table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(result, indent=2)
    fields = ("layer", "role", "neurons", "dim", "energy")
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in result["layers"]:
            writer.writerow({**row, "energy": repr(row["energy"])})
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"fmt={fmt!r} is not supported; accepted values: {list(ENERGY_FORMATS)}")
    cells = [[r["layer"], r["role"], str(r["neurons"]), str(r["dim"]), f"{r['energy']:.8g}"] for r in result["layers"]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(fields)]
    variant = (f"s={result['s']:g}, metric={result['metric']}, half_space={result['half_space']}, "
               f"mean over ordered pairs")
    lines = [f"hyperspherical energy of {result['checkpoint']} ({result['source']}; {variant})",
             "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(fields, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def energy_main(argv: Sequence[str]) -> int:
    """``lightning-hyper energy CHECKPOINT ...``: print the table; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="lightning-hyper energy",
        description="Per-layer hyperspherical energy (mean over ordered pairs of neurons, thesis Eq. 5.1) of a "
                    "saved model: a Lightning checkpoint of a lightning_hyper module, a plain state_dict or a "
                    "pickled nn.Module. Checkpoints holding more than tensors are fully unpickled: only open "
                    "files you trust.")
    parser.add_argument("checkpoint", help="path of the .ckpt / .pt file")
    parser.add_argument("--s", type=float, default=2.0, help="power s (0: logarithmic energy; default 2)")
    parser.add_argument("--metric", choices=METRICS, default="euclidean", help="distance (default euclidean)")
    parser.add_argument("--half-space", action="store_true", help="half-space energy (neurons and their negations)")
    parser.add_argument("--format", choices=ENERGY_FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--model", default=None, metavar="CLASS",
                        help="class (short name or class path) to rebuild the module with, if the checkpoint "
                             "does not say (default: the checkpoint's _class_path, else a search)")
    args = parser.parse_args(list(argv))  # argparse exits with status 2 on bad options
    path = Path(args.checkpoint)
    if not path.is_file():
        parser.error(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        result = checkpoint_energies(str(path), s=args.s, metric=args.metric, half_space=args.half_space,
                                     class_path=args.model)
    except Exception as err:  # noqa: BLE001  (unreadable file, bad s, ...: one clear line, status 2)
        parser.error(f"cannot compute energies of {str(path)!r}: {type(err).__name__}: {err}")
    print(format_energies(result, args.format), flush=True)
    return 0


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-hyper`` (returns ``None`` so the exit status is 0).

    ``energy`` is dispatched here, before LightningCLI; everything else goes to :func:`run_cli`.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "energy":
        energy_main(argv[1:])
        return None
    run_cli(args)


if __name__ == "__main__":
    main()
