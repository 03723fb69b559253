"""Command line: ``lightning-hyper fit --config configs/digits_mhe.yaml`` (or ``python -m lightning_hyper``).

A ``LightningCLI`` in subclass mode for both the model and the data, so configs name them by
``class_path`` (any LightningModule / LightningDataModule, including the user's own) and short
class names such as ``--model HypersphericalClassifier`` resolve, because this module imports
``lightning_hyper.models``, ``lightning_hyper.data`` and ``lightning_hyper.callbacks``.

* After ``fit``: the final metrics (accuracy, loss, penalties), each selected layer's
  hyperspherical energy once, in the model's layer order, at the start and at the end of the fit
  next to its closed-form minimum where one is known (:func:`~lightning_hyper.functional.minimum_energy`;
  the energy variant is the run's ``MHERegularizer`` / ``EnergyMonitor`` one), then the log folder
  and the checkpoint path. After ``validate``/``test``: the final metrics.
* Configuration errors (missing file, unknown key, wrong type, invalid value) print a few lines:
  the file, the key path, the problem, a "did you mean" for a misspelled key, and the fix; exit
  status 2. ``--verbose`` (anywhere on the command line) or ``LIGHTNING_HYPER_VERBOSE=1`` shows the
  full parser output / traceback instead (and Lightning's tips and other packages' deprecation
  warnings, which are hidden otherwise, in this command only).
* ``lightning-hyper --help`` (and ``fit --help``) lists the library's models, callbacks and data
  modules by short name (:func:`catalog`).
* Progress: Lightning's TQDM bar is on unless a config turns it off; ``--rich`` (or
  ``--trainer.callbacks+=RichProgressBar``) uses ``RichProgressBar`` instead (``--rich`` also turns
  the bar back on).
* ``lightning-hyper energy CHECKPOINT [--s S] [--metric M] [--half-space] [--format table|csv|json]
  [--unsafe-load]`` prints the per-layer hyperspherical energy of a saved model
  (:func:`checkpoint_energies`), outside LightningCLI's subcommands. Files are read with
  ``torch.load(weights_only=True)``; full unpickling needs ``--unsafe-load``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import torch
import yaml
from jsonargparse import ActionYesNo, ArgumentParser, DefaultHelpFormatter
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

import lightning_hyper.callbacks
import lightning_hyper.data
import lightning_hyper.models
from lightning_hyper.callbacks.base import NeuronSelection
from lightning_hyper.nn.selection import NeuronGroup, select_neurons, selection_table
from lightning_hyper.functional.energy import METRICS, hyperspherical_energy, minimum_energy
from lightning_hyper.functional.neurons import as_neurons

__all__ = ["ConfigError", "EnergySummary", "HyperCLI", "catalog", "checkpoint_energies", "energy_main",
           "format_energies", "format_energy_summary", "format_metrics", "layer_energies", "main",
           "quiet_third_party", "run_cli"]

PROG = "lightning-hyper"
VERBOSE_ENV = "LIGHTNING_HYPER_VERBOSE"
ENERGY_FORMATS = ("table", "csv", "json")

_HEADLINE = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc_epoch", "train/loss_epoch")
_EXTRA_WORDS = ("energy", "penalty", "mhe")
_BOOL_WORDS = ("true", "false", "yes", "no", "null", "none", "1", "0")
_MAX_ACCEPTED = 12  # names listed after "accepted:" in an error message


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
              "progress bar: Lightning's TQDM bar by default; --rich (after the subcommand) uses RichProgressBar",
              f"errors: a short description (file, key, problem, fix); --verbose (anywhere) or {VERBOSE_ENV}=1",
              "  shows the full parser output or traceback, Lightning's tips and other packages' deprecation warnings"]
    return "\n".join(lines)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter that keeps the line breaks of the description and epilog."""


def _parser_kwargs(verbose: bool = False) -> dict[str, Any]:
    epilog = _epilog()
    main = {"prog": PROG, "exit_on_error": verbose,
            "description": "lightning_hyper: deep hyperspherical learning on PyTorch Lightning "
                           "(MHE, CoMHE, SphereNet, DCNet, SphereFace, OPT, DH2L)",
            "epilog": epilog, "formatter_class": _HelpFormatter}
    for sub in LightningCLI.subcommands():
        main[sub] = {"epilog": epilog, "formatter_class": _HelpFormatter}
    return main


# ------------------------------------------------------------------------------------------ quiet runs
class _TipFilter(logging.Filter):
    """Drops Lightning's advertising tips (litlogger / litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("💡") or "litlogger" in msg or "litmodels" in msg)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: no Lightning tips (``rank_zero_info`` "💡 Tip: ... litlogger / litmodels"), and
    ``DeprecationWarning`` / ``PendingDeprecationWarning`` / ``FutureWarning`` raised outside
    ``lightning_hyper`` are ignored. Filters are removed on exit; importing the library changes nothing."""
    from lightning_utilities.core import rank_zero

    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "lightning_fabric.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero")
    loggers = {rank_zero.log, *(logging.getLogger(n) for n in names)}
    tips = _TipFilter()
    for logger in loggers:
        logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(?!lightning_hyper(\.|$))")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


# ------------------------------------------------------------------------------------------ config errors
class ConfigError(ValueError):
    """A configuration the CLI cannot run, described in a few lines (file, key, problem, fix)."""


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first."""
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _tidy(text: str) -> str:
    """jsonargparse's ``<class 'float'>`` -> ``float``."""
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)


def _suggest(name: str, accepted: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(accepted), n=1, cutoff=0.6)
    return close[0] if close else None


def _preview(names: Sequence[str], k: int = _MAX_ACCEPTED) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k} more)" if len(names) > k else "")


def _resolve_class(class_path: str) -> type | None:
    """A class from a class path or a short name of the library (``None`` if it cannot be imported)."""
    if "." not in class_path:
        for package in (lightning_hyper.models, lightning_hyper.callbacks, lightning_hyper.data):
            if inspect.isclass(getattr(package, class_path, None)):
                return getattr(package, class_path)
        return None
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return obj if inspect.isclass(obj) else None


def _class_arguments(cls: type) -> list[str]:
    """Init arguments jsonargparse accepts for ``cls`` (its signature, ``**kwargs`` resolved)."""
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False)
        names = [a.dest for a in parser._actions if a.dest != "help" and not a.dest.endswith(".help")]
        return list(dict.fromkeys(n.split(".")[0] for n in names))
    except Exception:
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _same_class(a: str, b: str) -> bool:
    return a == b or a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _load_yaml(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except Exception:
        return None


def _key_paths(node: Any, path: tuple = (), owner: str | None = None) -> Iterator[tuple[tuple, str | None]]:
    """Every key of a YAML tree as a path (list indices as ints), with the class_path that owns it."""
    if isinstance(node, Mapping):
        if isinstance(node.get("class_path"), str):
            owner = node["class_path"]
        for key, value in node.items():
            yield path + (str(key),), owner
            yield from _key_paths(value, path + (str(key),), owner)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _key_paths(value, path + (i,), owner)


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _logical(path: Sequence[Any]) -> list[str]:
    return [str(p) for p in path if not isinstance(p, int) and p != "init_args"]


def _locate(files: Sequence[str], logical: Sequence[str], class_path: str | None) -> tuple[str, str] | None:
    """``(file, dotted key path)`` of the first config file key matching ``logical`` (keys without list
    indices and ``init_args``) inside a ``class_path`` entry of that class (if given)."""
    for file in files:
        for path, owner in _key_paths(_load_yaml(file)):
            if _logical(path) == list(logical) and (class_path is None or owner is None
                                                    or _same_class(owner, class_path)):
                return file, _dotted(path)
    return None


def _where(files: Sequence[str], argv: Sequence[str], logical: Sequence[str], class_path: str | None,
           fallback_key: str) -> tuple[str, str]:
    """(file, key) for a message: the command line if a flag sets the key (it wins over files), else the
    config file holding it, else the config files given."""
    for arg in argv:
        flag = arg[2:].split("=")[0] if arg.startswith("--") else ""
        if flag and [c for c in flag.split(".") if c != "init_args"] == list(logical):
            return "(command line)", fallback_key
    found = _locate(files, logical, class_path)
    if found:
        return found
    return (", ".join(files) if files else "(no config file)"), fallback_key


def _message(prog: str, headline: str, fields: Sequence[tuple[str, str | None]], verbose_what: str) -> str:
    lines = [f"{prog}: error: {headline}"]
    for label, value in fields:
        if value is None:
            continue
        for i, line in enumerate(str(value).splitlines()[:6] or [""]):
            lines.append(f"  {label + ':' if i == 0 and label else '':<10}{line}" if label else f"  {line}")
    lines.append(f"  (full {verbose_what}: add --verbose or set {VERBOSE_ENV}=1)")
    return "\n".join(lines)


def _parser_dests(parser: Any) -> list[str]:
    return [a.dest for a in getattr(parser, "_actions", []) if a.dest not in ("help", argparse.SUPPRESS)
            and not a.dest.endswith(".help")]


def _children(dests: Sequence[str], parent: Sequence[str]) -> list[str]:
    """Next key components under ``parent`` among the parser's argument names."""
    prefix = ".".join(parent)
    out = []
    for d in dests:
        if not parent:
            out.append(d.split(".")[0])
        elif d.startswith(prefix + "."):
            out.append(d[len(prefix) + 1:].split(".")[0])
    return list(dict.fromkeys(out))


def describe_parse_error(err: BaseException, argv: Sequence[str], parser: Any = None, prog: str = PROG) -> str:
    """A short description of a jsonargparse parse error (``exit_on_error=False``): file, key path,
    problem, "did you mean" for a misspelled key, fix. ``parser`` is the subcommand's parser."""
    chain = _chain(err)
    heads = [_first_line(e) for e in chain]
    keys = list(dict.fromkeys(m.group(1) for h in heads if (m := re.match(r'Parser key "([^"]+)"', h))))
    classes = list(dict.fromkeys(m.group(1) for h in heads
                                 if (m := re.match(r"Problem with given class_path '([^']+)'", h))))
    leaf = str(chain[-1]).strip()
    files = _config_files(argv)
    class_path = classes[-1] if classes else None
    nested = [p for k in keys for p in k.split(".")]

    # --config FILE: missing or not YAML
    missing = re.search(r"File does not exist: '([^']+)'", leaf)
    if missing or keys == ["config"]:
        name = missing.group(1) if missing else (files[-1] if files else "?")
        typed = next((f for f in files if Path(f).resolve() == Path(name).resolve()), name)
        folder = Path(typed).parent
        near = {p.stem: str(folder / p.name) if str(folder) != "." else p.name
                for p in (folder.glob("*") if folder.is_dir() else []) if p.suffix in (".yaml", ".yml", ".json")}
        guess = _suggest(Path(typed).stem, sorted(near))
        return _message(prog, f"config file {typed!r} not found", [
            ("file", typed), ("key", "--config"),
            ("problem", f"no such file (working directory: {os.getcwd()})" if missing else _tidy(leaf)),
            ("", f"did you mean {near[guess]!r}?" if guess else None),
            ("fix", "give the path of an existing YAML file, e.g. configs/digits_mhe.yaml of the repository")],
            "parser output")
    if heads[0].startswith("Problems parsing config") or isinstance(chain[-1], yaml.YAMLError):
        text = leaf.replace('"<unicode string>"', repr(files[-1]) if files else "the config")
        return _message(prog, "the config file is not valid YAML", [
            ("file", ", ".join(files) or None), ("problem", text),
            ("fix", "correct the YAML syntax at the line shown")], "parser output")

    # unknown key
    option = re.search(r"Option '([^']+)' is not accepted", leaf) or re.search(
        r"Subcommand '[^']+' does not accept option '([^']+)'", leaf)
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", leaf)
    if option or group:
        dests = _parser_dests(parser)
        if group:
            parent, bad = group.group(1).split("."), group.group(2)
            accepted, owner = _children(dests, parent), f"accepted in the {group.group(1)!r} section"
        elif class_path is not None:
            parent, bad = nested, option.group(1)
            cls = _resolve_class(class_path)
            accepted, owner = (_class_arguments(cls) if cls else []), f"an argument of {class_path}"
        else:
            parts, parent, bad = option.group(1).split("."), [], option.group(1)
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if not any(d == prefix or d.startswith(prefix + ".") for d in dests):
                    parent, bad = parts[:k - 1], parts[k - 1]
                    break
            accepted = _children(dests, parent)
            owner = f"accepted in the {'.'.join(parent)!r} section" if parent else "accepted at the top level"
        bad = bad.split(".")[0]
        logical = [*parent, bad]
        shown = [*parent, "init_args", bad] if class_path is not None and not group else logical
        file, key = _where(files, argv, logical, class_path, ".".join(shown))
        guess = _suggest(bad, accepted)
        return _message(prog, f"unknown key {bad!r} in the configuration", [
            ("file", file), ("key", key),
            ("problem", f"{bad!r} is not {owner}"),
            ("", f"did you mean {guess!r}?" if guess else None),
            ("accepted", _preview(accepted) if accepted else None),
            ("fix", f"rename or remove the key ({prog} --help lists the arguments)")],
            "parser output")

    # class_path that cannot be imported
    if class_path is not None and isinstance(chain[-1], (ImportError, AttributeError)):
        names = [n for names in catalog().values() for n in names]
        guess = _suggest(class_path.rsplit(".", 1)[-1], names)
        file, key = _where(files, argv, [*nested, "class_path"], class_path, _dotted([*nested, "class_path"]))
        return _message(prog, f"class {class_path!r} not found", [
            ("file", file), ("key", key), ("problem", _tidy(leaf)),
            ("", f"did you mean {guess!r}?" if guess else None),
            ("fix", f"give a short name of the library or a full class path ({PROG} --help lists them)")],
            "parser output")

    # wrong type or value of a known key
    got = re.search(r"Got value: (.*)", leaf)
    if keys and (got or len(chain) > 1):
        shown = [keys[0], "init_args", *keys[1:]] if class_path is not None and len(keys) > 1 else nested
        file, key = _where(files, argv, nested, class_path, ".".join(shown))
        expected = _tidy(re.sub(r"^Expected an? ", "expected ", leaf.split(". Got value:")[0])) if got else _tidy(leaf)
        return _message(prog, f"invalid value for {key}", [
            ("file", file), ("key", key + (f" ({class_path})" if class_path else "")),
            ("value", got.group(1).strip() if got else None), ("problem", expected),
            ("fix", "give a value of the expected type")], "parser output")

    # anything else (unknown subcommand, unrecognized or missing arguments): the parser's own words
    choice = re.search(r"invalid choice: '([^']+)' \(choose from (.*)\)", leaf)
    guess = _suggest(choice.group(1), re.findall(r"'([^']+)'", choice.group(2))) if choice else None
    unknown = re.search(r"unrecognized arguments: (\S+)", leaf)
    if unknown and parser is not None:
        options = [o for a in getattr(parser, "_actions", []) for o in a.option_strings]
        guess = _suggest(unknown.group(1).split("=")[0], options)
    return _message(prog, _tidy(heads[0]), [
        ("file", ", ".join(files) or None), ("problem", _tidy(leaf) if leaf != heads[0] else None),
        ("", f"did you mean {guess!r}?" if guess else None),
        ("fix", f"see {prog} --help")], "parser output")


def _subcommand(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in LightningCLI.subcommands()), None)


def _failing_class(err: BaseException) -> type | None:
    """The class whose constructor raised: the innermost ``class_type`` that jsonargparse / LightningCLI
    were instantiating, else the outermost ``__init__`` on the traceback."""
    root = _chain(err)[-1]
    found: type | None = None
    outer_init: type | None = None
    tb = root.__traceback__
    while tb is not None:
        frame_locals = tb.tb_frame.f_locals
        if inspect.isclass(frame_locals.get("class_type")):
            found = frame_locals["class_type"]
        elif outer_init is None and tb.tb_frame.f_code.co_name == "__init__" and "self" in frame_locals:
            outer_init = type(frame_locals["self"])
        tb = tb.tb_next
    return found or outer_init


def _find_class(node: Any, cls: type, path: tuple = ()) -> list[tuple]:
    """Paths of the ``class_path`` entries of ``cls`` in a config tree."""
    full = f"{cls.__module__}.{cls.__qualname__}"
    out: list[tuple] = []
    if isinstance(node, Mapping):
        if isinstance(node.get("class_path"), str) and (_resolve_class(node["class_path"]) is cls
                                                         or _same_class(node["class_path"], full)):
            out.append(path)
        for key, value in node.items():
            out += _find_class(value, cls, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _find_class(value, cls, path + (i,))
    return out


def describe_instantiation_error(err: BaseException, config: Mapping[str, Any], argv: Sequence[str],
                                 prog: str = PROG) -> str:
    """A short description of an invalid value that a constructor rejected while the CLI built the
    classes: the library's own message once (no traceback, no namespace dump), with file and key."""
    root = _chain(err)[-1]
    problem = str(root).strip() or type(root).__name__
    cls = _failing_class(err)
    files = _config_files(argv)
    location: tuple = ()
    class_path = None
    if cls is not None and issubclass(cls, Trainer):
        location = ("trainer",)
    elif cls is not None:
        class_path = f"{cls.__module__}.{cls.__qualname__}"
        candidates = _find_class(config, cls)
        location = candidates[0] if candidates else ()
        if len(candidates) > 1:  # several entries of this class: the one holding a value the message quotes
            for path in candidates:
                node: Any = config
                for part in path:
                    node = node[part]
                args = (node.get("init_args") or {}) if isinstance(node, Mapping) else {}
                if any(f"{k}={v!r}" in problem or f"{k}={v}" in problem for k, v in args.items()):
                    location = path
                    break
    accepted = _class_arguments(cls) if cls is not None else []
    arg = next((m for m in re.findall(r"([A-Za-z_]\w*)\s*=", problem) if m in accepted), None)
    if arg is None:
        arg = next((m for m in re.findall(r"^([A-Za-z_]\w*):", problem) if m in accepted), None)
    key_path = location + (("init_args", arg) if class_path and arg else ((arg,) if arg else ()))
    key = _dotted(key_path) or "(unknown key)"
    file, key = _where(files, argv, _logical(key_path), class_path, key) if key_path else (
        ", ".join(files) or "(no config file)", key)
    if class_path and location:
        node = config
        for part in location:
            node = node[part]
        class_path = node.get("class_path", class_path)  # as the config names it
    owner = f" ({class_path})" if class_path else (f" ({cls.__name__})" if cls is not None else "")
    return _message(prog, "invalid value in the configuration", [
        ("file", file), ("key", key + owner), ("problem", problem),
        ("fix", f"change {key} to one of the accepted values" if arg else
         f"correct the arguments of{owner or ' the classes'} in the configuration")], "traceback")


# ------------------------------------------------------------------------------------------ energy summary
def _energy_source(callbacks: Sequence[Callback]) -> tuple[str, dict[str, Any], NeuronSelection]:
    """The run's energy variant and layer selection: the first ``MHERegularizer`` with an MHE metric,
    else the first ``EnergyMonitor``, else the defaults of ``hyperspherical_energy`` on every layer."""
    from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer

    for kind in (MHERegularizer, EnergyMonitor):
        for cb in callbacks:
            if isinstance(cb, kind) and getattr(cb, "metric", None) in METRICS:
                settings = {"s": float(cb.s), "metric": cb.metric, "half_space": bool(cb.half_space),
                            "angle_unit": cb.angle_unit, "eps": float(cb.eps)}
                return type(cb).__name__, settings, getattr(cb, "selection", None) or NeuronSelection()
    return "default", {"s": 2.0, "metric": "euclidean", "half_space": False, "angle_unit": "radian",
                       "eps": 1e-6}, NeuronSelection()


@torch.no_grad()
def layer_energies(layers: Sequence[NeuronGroup], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each layer's mean hyperspherical energy (float64) with the given settings (half-space on hidden
    layers only, as the callbacks do; grouped convolutions: the mean over the groups) and its closed-form
    minimum (``None`` if unknown), in layer order. ``N`` is the number of neurons per group."""
    rows = []
    for ref in layers:
        neurons = ref.neurons().detach().to("cpu", torch.float64)
        n, d = int(neurons.shape[-2]), int(neurons.shape[-1])
        half = bool(settings["half_space"]) and ref.role == "hidden"
        kwargs = {"s": settings["s"], "metric": settings["metric"], "half_space": half,
                  "angle_unit": settings["angle_unit"], "eps": settings["eps"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a layer of one neuron: 0, documented
            energy = hyperspherical_energy(neurons, zero_norm="exclude", **kwargs)
        rows.append({"layer": ref.name, "role": ref.role, "neurons": n, "dim": d,
                     "energy": float(energy.mean()), "minimum": minimum_energy(n, d, **kwargs)})
    return rows


class EnergySummary(Callback):
    """Added by the CLI: measures every selected layer's energy at the start of ``fit`` (with the run's
    ``MHERegularizer`` / ``EnergyMonitor`` settings), so that the end-of-fit summary can show it next to
    the final energy and the minimum. Never changes training."""

    def __init__(self) -> None:
        super().__init__()
        self.source, self.settings, self.selection = _energy_source([])
        self.layers: list[NeuronGroup] = []
        self.initial: dict[str, float] = {}
        self.resumed = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.source, self.settings, self.selection = _energy_source(trainer.callbacks)
        try:  # before the first batch: the static output-layer rule (the model's output_layer_name, else last)
            self.layers = self.selection.resolve(pl_module)
        except ValueError:  # a model without neuron layers: no energy table
            self.layers = []
        self.initial = {r["layer"]: r["energy"] for r in layer_energies(self.layers, self.settings)}
        self.resumed = trainer.ckpt_path is not None

    def rows(self) -> list[dict[str, Any]]:
        """Layer rows of :func:`layer_energies` now, with ``"initial"`` added."""
        return [{**r, "initial": self.initial.get(r["layer"], math.nan)}
                for r in layer_energies(self.layers, self.settings)]


def format_energy_summary(rows: Sequence[Mapping[str, Any]], source: str, settings: Mapping[str, Any],
                          title: str = "energy per layer", resumed: bool = False) -> str:
    """Aligned table: layer, N, d, energy at the start and at the end of fit, closed-form minimum."""
    if not rows:
        return f"{title}: (no layer with neurons)"
    variant = (f"s={settings['s']:g}, metric={settings['metric']}, half_space={settings['half_space']}"
               f"{' (hidden layers)' if settings['half_space'] else ''}; mean over ordered pairs")
    start = "init = the resumed checkpoint" if resumed else "init = before the first step"
    header = ("layer", "N", "d", "init", "final", "minimum")
    cells = [[r["layer"] + (" (output)" if r["role"] == "output" else ""), str(r["neurons"]), str(r["dim"]),
              f"{r['initial']:.6g}", f"{r['energy']:.6g}",
              "-" if r["minimum"] is None else f"{r['minimum']:.6g}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([f"{title} ({source}: {variant}; {start}):", line(header), *map(line, cells),
                      "  minimum: regular simplex (full space, N <= d+1), orthonormal frame (half space, N <= d); "
                      "'-': no closed form"])


def _checkpoint_lines(trainer: Trainer) -> list[str]:
    """``checkpoint: PATH (best by <monitor> | latest | last)`` for each ``ModelCheckpoint`` that saved."""
    lines = []
    for cb in trainer.checkpoint_callbacks:
        best, last = getattr(cb, "best_model_path", ""), getattr(cb, "last_model_path", "")
        monitor = getattr(cb, "monitor", None)
        if best:
            lines.append(f"checkpoint: {best} ({f'best by {monitor}' if monitor else 'latest'})")
        if last and last != best:
            lines.append(f"checkpoint: {last} (last)")
    if not trainer.checkpoint_callbacks:
        return ["checkpoint: none (checkpointing is off)"]
    return lines or ["checkpoint: none saved"]


class HyperCLI(LightningCLI):
    """``LightningCLI`` with short configuration errors, a summary after each subcommand (per-layer
    energies and paths after ``fit``), the library's classes in ``--help`` and ``--rich``.

    Args:
        verbose: keep jsonargparse's full parser output and the full tracebacks on errors.
        *args, **kwargs: ``LightningCLI``'s (``parser_kwargs`` should set ``exit_on_error=verbose``).
    """

    def __init__(self, *args: Any, verbose: bool = False, **kwargs: Any) -> None:
        self.verbose = verbose
        self.argv: list[str] = []
        self.energy_summary = EnergySummary()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--rich", action=ActionYesNo, default=False,
                            help="Show Lightning's RichProgressBar instead of the TQDM bar (turns the bar on).")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing; a parse error becomes a :class:`ConfigError` with a short message."""
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if args is None or isinstance(
            args, (list, tuple)) else []
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            if self.verbose:
                raise
            sub = _subcommand(self.argv)
            sub_parser = getattr(self, "_subcommand_parsers", {}).get(sub, parser)
            prog = f"{PROG} {sub}" if sub else PROG
            raise ConfigError(describe_parse_error(err, self.argv, sub_parser, prog)) from None

    def instantiate_classes(self) -> None:
        """LightningCLI's instantiation; a constructor's ``ValueError`` / ``TypeError`` becomes a
        :class:`ConfigError` carrying that message once, with the file and key that set the value."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if self.verbose or isinstance(err, ConfigError):
                raise
            config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
            tree = config.as_dict() if hasattr(config, "as_dict") else dict(config)
            prog = f"{PROG} {self.subcommand}" if self.subcommand else PROG
            raise ConfigError(describe_instantiation_error(err, tree, self.argv, prog)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """``--rich``: replace any progress bar by ``RichProgressBar`` (and turn the bar on). Otherwise,
        if the bar is on and no bar callback is configured, pin Lightning's ``TQDMProgressBar`` (Lightning
        itself would pick ``RichProgressBar`` whenever ``rich`` is installed). Adds :class:`EnergySummary`."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer_init = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_init.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("rich", False):
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)] + [RichProgressBar()]
            kwargs = {"enable_progress_bar": True, **kwargs}
        elif trainer_init.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                               for c in callbacks):
            callbacks.append(TQDMProgressBar())
        kwargs = {"callbacks": [*callbacks, self.energy_summary], **kwargs}
        return super().instantiate_trainer(**kwargs)

    def _print_summary(self, subcommand: str) -> None:
        if self.trainer.is_global_zero:
            print(format_metrics(self.trainer.callback_metrics, title=f"{subcommand}: final metrics"), flush=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir if trainer.loggers else None  # a collective call: every rank
        if not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if "/energy/" not in k}
        summary = self.energy_summary
        rows = summary.rows() if summary.layers else []
        print("\n".join([
            format_metrics(metrics, title="fit: final metrics"),
            format_energy_summary(rows, summary.source, summary.settings, title="fit: energy per layer",
                                  resumed=summary.resumed),
            f"fit: logs: {log_dir}" if log_dir else "fit: logs: none (no logger)",
            *(f"fit: {line}" for line in _checkpoint_lines(trainer))]), flush=True)

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")


def run_cli(args: list[str] | None = None, run: bool = True, verbose: bool = False) -> HyperCLI:
    """Build (and by default run) the CLI on ``args`` (``None``: ``sys.argv``); returns it. Configuration
    errors raise :class:`ConfigError` (``verbose=True``: jsonargparse's own exit and full tracebacks)."""
    return HyperCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=_parser_kwargs(verbose),
        args=args,
        run=run,
        verbose=verbose,
    )


# ------------------------------------------------------------------------------------------ energy
class CheckpointError(ValueError):
    """A file that safe loading cannot read; the message is one line."""


def _is_torch_file(path: str) -> bool:
    """A ``torch.save`` zip archive or a pickle (protocol >= 2, as legacy ``torch.save``)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _is_distributed_checkpoint(path: str) -> bool:
    """A folder written by Lightning's ModelParallelStrategy / FSDP (``torch.distributed.checkpoint`` shards and
    ``meta.pt``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.pt"))


def _load_distributed(path: str, unsafe: bool) -> dict[str, Any]:
    """A distributed checkpoint as one checkpoint dict: ``meta.pt`` (hyper-parameters, callbacks, loops) and the
    consolidated full ``state_dict`` (read on CPU in this process, no process group)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta_path = os.path.join(path, "meta.pt")
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:
        raise CheckpointError(f"{meta_path}: safe loading (torch.load weights_only=True) refused it "
                              f"({_first_line(err)}); if you trust the file, rerun with --unsafe-load") from None
    with tempfile.TemporaryDirectory() as tmp:  # torch's public converter: the shards as one torch.save file
        full = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(path, full)
        state = torch.load(full, map_location="cpu", weights_only=not unsafe)
    return {**meta, "state_dict": state.get("state_dict", state)}


def _load_checkpoint(path: str, unsafe: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (tensors and plain containers only); ``unsafe``:
    full unpickling, which runs arbitrary code from the file (only for files you trust).

    Raises:
        CheckpointError: the file is not a PyTorch checkpoint, or holds objects safe loading refuses.
    """
    if _is_distributed_checkpoint(path):
        return _load_distributed(path, unsafe)
    if unsafe:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not _is_torch_file(path):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save archive nor a "
                                  "pickle)") from None
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        reason = (f"it holds a {found.group(1)} object" if found else
                  next((line.strip() for line in text.splitlines() if "error" in line.lower()), _first_line(err)))
        raise CheckpointError(f"{path}: safe loading (torch.load weights_only=True) refused it: {reason}; if you "
                              "trust the file, rerun with --unsafe-load") from None


def _import(class_path: str) -> type:
    """The ``nn.Module`` class of a short name of the library or a full class path."""
    if "." not in class_path:  # a short name of the library
        for package in (lightning_hyper.models, lightning_hyper.nn):
            if hasattr(package, class_path):
                return getattr(package, class_path)
        raise ValueError(f"--model: {class_path!r} is not a class of lightning_hyper.models; give a full class path")
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"class path {class_path!r} is not an nn.Module class; give the saved module's class")
    return cls


def _trusted_class_path(path: str) -> bool:
    """A class path a checkpoint may name without ``--model`` / ``--unsafe-load``: this library's own."""
    return path.split(".")[0] == "lightning_hyper"


def _rebuild(state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any], class_path: str | None,
             unsafe: bool = False) -> nn.Module | None:
    """The saved module, rebuilt from its class and ``hyper_parameters`` with its ``state_dict`` loaded
    strictly; ``None`` if no candidate class fits. Candidates: ``class_path``, else the checkpoint's
    ``_class_path`` (LightningCLI runs; outside ``lightning_hyper`` only with ``unsafe``: importing and
    calling a class a file names runs code), else every LightningModule of ``lightning_hyper.models``."""
    path = class_path or hparams.get("_class_path")
    if path and class_path is None and not (isinstance(path, str) and (unsafe or _trusted_class_path(path))):
        return None
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
        except Exception:
            continue
        return module.eval()
    return None


def checkpoint_energies(path: str, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                        class_path: str | None = None, unsafe_load: bool = False) -> dict[str, Any]:
    r"""Per-layer hyperspherical energy of a saved model (thesis Eq. 5.1, mean over ordered pairs).

    ``path`` is a Lightning checkpoint (``state_dict`` + ``hyper_parameters``; also the folder a sharded run
    writes with ``ModelParallelStrategy``: its shards are consolidated on CPU), a plain ``state_dict`` or a
    pickled ``nn.Module``. A Lightning checkpoint of a library module is rebuilt
    (class from ``class_path``, the checkpoint's ``_class_path`` or a search over
    ``lightning_hyper.models``) so that layers are the ones the callbacks see (``select_neurons``,
    effective weights of parametrized layers such as OPT, roles hidden/output). Otherwise every
    tensor with at least 2 dimensions whose key ends with ``weight`` is read as neurons by
    ``as_neurons`` (role ``"-"``). Energies come from ``hyperspherical_energy`` in float64
    (zero-norm rows left out).

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers, as Lightning
    checkpoints of this library hold); ``unsafe_load=True`` unpickles anything, which runs code from the
    file, and also lets a checkpoint name a class outside ``lightning_hyper`` to rebuild. A pickled
    ``nn.Module`` needs ``unsafe_load``.

    Raises:
        CheckpointError: the file is not a PyTorch checkpoint, or safe loading refused it (one line).

    Returns:
        ``{"checkpoint", "source", "s", "metric", "half_space", "layers": [{"layer", "role",
        "neurons", "dim", "energy"}, ...]}``; ``source`` is ``"module:<class path>"`` or ``"state_dict"``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; accepted values: {list(METRICS)}")
    obj = _load_checkpoint(path, unsafe=unsafe_load)
    module: nn.Module | None = obj if isinstance(obj, nn.Module) else None
    state: Mapping[str, Any] | None = None
    note = None
    if module is None:
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            state = obj["state_dict"]
            hparams = obj.get("hyper_parameters") or {}
            named = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
            if isinstance(named, str) and class_path is None and not unsafe_load and not _trusted_class_path(named):
                note = (f"the checkpoint names class {named!r}, outside lightning_hyper: not imported, weights read "
                        f"as a state_dict (pass --model {named} to rebuild it)")
            module = _rebuild(state, hparams if isinstance(hparams, Mapping) else {}, class_path, unsafe_load)
        elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
            if class_path is not None:
                module = _rebuild(state, {}, class_path, unsafe_load)
        else:
            raise ValueError(f"{path}: not a Lightning checkpoint, a state_dict or an nn.Module "
                             f"(got {type(obj).__name__})")
    rows: list[tuple[str, str, torch.Tensor]] = []
    if module is not None:
        source = f"module:{type(module).__module__}.{type(module).__qualname__}"
        rows = [(ref.name, ref.role, ref.neurons().detach()) for ref in select_neurons(module)]
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a layer of one neuron: 0, documented
            e = hyperspherical_energy(neurons.double(), s=s, metric=metric, half_space=half_space,
                                      zero_norm="exclude")
        layers.append({"layer": name, "role": role, "neurons": int(neurons.shape[-2]), "dim": int(neurons.shape[-1]),
                       "energy": float(e.mean())})
    result = {"checkpoint": str(path), "source": source, "s": float(s), "metric": metric, "half_space": half_space,
              "layers": layers}
    if note:
        result["note"] = note
    return result


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




def energy_main(argv: Sequence[str], verbose: bool = False) -> int:
    """``lightning-hyper energy CHECKPOINT ...``: print the table; returns 0. Bad options exit with status 2
    (argparse); an unreadable file or bad value prints one line and exits with status 2 (``verbose``:
    the traceback)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} energy",
        description="Per-layer hyperspherical energy (mean over ordered pairs of neurons, thesis Eq. 5.1) of a "
                    "saved model: a Lightning checkpoint of a lightning_hyper module, a plain state_dict or (with "
                    "--unsafe-load) a pickled nn.Module. Files are read with torch.load(weights_only=True): "
                    "tensors and plain containers only, no code runs.")
    parser.add_argument("checkpoint", help="path of the .ckpt / .pt file")
    parser.add_argument("--s", type=float, default=2.0, help="power s (0: logarithmic energy; default 2)")
    parser.add_argument("--metric", choices=METRICS, default="euclidean", help="distance (default euclidean)")
    parser.add_argument("--half-space", action="store_true", help="half-space energy (neurons and their negations)")
    parser.add_argument("--format", choices=ENERGY_FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--model", default=None, metavar="CLASS",
                        help="class (short name or class path) to rebuild the module with, if the checkpoint "
                             "does not say (default: the checkpoint's _class_path if it is a lightning_hyper "
                             "class, else a search over lightning_hyper.models)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle everything (torch.load weights_only=False), e.g. a pickled nn.Module, and "
                             "rebuild a class outside lightning_hyper that the checkpoint names. This RUNS CODE "
                             "from the file: only for files you trust")
    args = parser.parse_args(list(argv))  # argparse exits with status 2 on bad options
    path = Path(args.checkpoint)
    try:
        if not (path.is_file() or _is_distributed_checkpoint(str(path))):
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file (or a distributed "
                                  "checkpoint folder with meta.pt)")
        result = checkpoint_energies(str(path), s=args.s, metric=args.metric, half_space=args.half_space,
                                     class_path=args.model, unsafe_load=args.unsafe_load)
    except Exception as err:
        if verbose:
            raise
        text = str(err) if isinstance(err, CheckpointError) else \
            f"cannot compute energies of {str(path)!r}: {type(err).__name__}: {_first_line(err)}"
        print(f"{PROG} energy: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if result.get("note"):
        print(f"{PROG} energy: note: {result['note']}", file=sys.stderr, flush=True)
    print(format_energies(result, args.format), flush=True)
    return 0


def _take_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Remove a bare ``--verbose`` (this CLI's flag); ``--verbose true|false`` (the ``validate`` / ``test``
    option of Lightning) stays. Also on with ``LIGHTNING_HYPER_VERBOSE=1``."""
    verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--verbose" and not (i + 1 < len(argv) and argv[i + 1].lower() in _BOOL_WORDS):
            verbose = True
        else:
            out.append(arg)
    return out, verbose


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-hyper`` (returns ``None`` so the exit status is 0).

    ``energy`` is dispatched here, before LightningCLI; everything else goes to :func:`run_cli`. Both run
    inside :func:`quiet_third_party` unless verbose. A :class:`ConfigError` prints its few lines on stderr and
    exits with status 2.
    """
    argv, verbose = _take_verbose(sys.argv[1:] if args is None else list(args))
    quiet = contextlib.nullcontext() if verbose else quiet_third_party()
    if argv and argv[0] == "energy":
        with quiet:
            energy_main(argv[1:], verbose=verbose)
        return None
    if argv and argv[0] == "layers":
        try:
            with quiet:
                print(layers_main(argv[1:], verbose=verbose))
        except ConfigError as err:
            print(err, file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        return None
    if args is None:  # LightningCLI reads sys.argv itself (passing args too would make it warn)
        sys.argv[1:] = argv
    try:
        with quiet:
            run_cli(None if args is None else argv, verbose=verbose)
    except ConfigError as err:
        print(err, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (FloatingPointError, ValueError, TypeError) as err:
        short = None if verbose else runtime_error_message(err, argv[0] if argv else "fit")
        if short is None:
            raise
        print(short, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return None


def layers_main(argv: Sequence[str], verbose: bool = False) -> str:
    """``lightning-hyper layers --config FILE [overrides]``: what every callback of the config would
    select (the table printed at the start of fit: name, role, N, d, groups, and what is skipped and why),
    without training. The model is run once on the first training batch, as at the first step of fit."""
    from lightning_hyper.callbacks.base import PenaltyCallback

    parser = argparse.ArgumentParser(prog="lightning-hyper layers", description=layers_main.__doc__)
    parser.add_argument("--config", required=True, help="a fit config (configs/*.yaml)")
    args, overrides = parser.parse_known_args(list(argv))
    cli = run_cli(["--config", args.config, "--trainer.logger=false", *overrides], run=False, verbose=verbose)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(getattr(cb, "selection", None), NeuronSelection)
                 and not isinstance(cb, EnergySummary)]
    if not callbacks:
        return f"{args.config}: no callback selects layers (MHERegularizer, CoMHERegularizer, EnergyMonitor, ...)"
    batch = None
    if cli.datamodule is not None:
        cli.datamodule.setup("fit")
        batch = next(iter(cli.datamodule.train_dataloader()))
    reports = []
    for cb in callbacks:
        if isinstance(cb, PenaltyCallback) or hasattr(cb, "selection_report"):
            verbose_before = getattr(cb, "verbose", None)
            if verbose_before is not None:
                cb.verbose = False
            cb.resolve(cli.model, batch)
            if verbose_before is not None:
                cb.verbose = verbose_before
            reports.append(cb.selection_report())
        else:
            groups, skipped = cb.selection.resolve(cli.model, return_skipped=True)
            reports.append(f"{type(cb).__name__}:\n{selection_table(groups, skipped)}")
    return "\n\n".join(reports)


def runtime_error_message(err: BaseException, command: str) -> str | None:
    """A few lines for an error the library raised while training (divergence, a selection that matches
    nothing, a bad batch), or ``None`` for anything else (a bug shows its whole traceback)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = bool(frames) and f"{os.sep}lightning_hyper{os.sep}" in frames[-1].filename
    if not (ours or isinstance(err, FloatingPointError)):
        return None
    kind = "training diverged" if "diverged" in str(err) else f"{type(err).__name__} during {command}"
    lines = [f"lightning-hyper {command}: error: {kind}", *textwrap.wrap(str(err), 110, initial_indent="  ",
                                                                            subsequent_indent="  ")]
    lines.append(f"  (full traceback: add --verbose or set {VERBOSE_ENV}=1)")
    return "\n".join(lines[:14])


if __name__ == "__main__":
    main()
