"""The papers' own settings on a GPU: ``python benchmarks/reproduce.py --device cuda --full``.

The ``full:`` section of ``claims_settings.yaml`` holds each setting as the papers ran it (CIFAR-10/100,
CNN-9 / CNN-6, optimizer, schedule, epochs): CNN-9 with MHE, half-space MHE and RP-CoMHE on CIFAR-100
(MHE thesis Tables 5.1-5.3, CoMHE Tables 6.1/6.5), SphereNet vs CNN-9 on CIFAR-10 (SphereNet §3.4.2) and
OPT CNN-6 on CIFAR-100 (OPT Table 7.4). Each arm of a setting is a LightningModule of
``lightning_hyper.models`` plus callbacks of ``lightning_hyper.callbacks``, built from the file by name;
every seed trains every arm (paired), and ``reproduce.py`` turns the test metrics into claims with the
same statistics as the small-scale table (written to ``OUT/paper_claims.{md,json,png}``).

Nothing runs without what it needs: :func:`missing` names, in one line, the GPU or the data that is not
there (the CIFAR folders must be under ``--data-root``, default ``data/``; nothing downloads and no
synthetic stand-in is used).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

#: torchvision's folder of each dataset under the data root
DATA_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def missing(device: str, root: Path, full: dict[str, Any]) -> str | None:
    """What is missing to run the papers' settings, as one line (``None``: nothing)."""
    problems = []
    if not str(device).startswith("cuda"):
        problems.append(f"--device {device} given, the papers' settings need --device cuda")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU (torch.cuda.is_available() is False)")
    needed = sorted({g["dataset"] for g in full["groups"].values()})
    absent = [f"{name} ({root / DATA_FOLDERS[name]})" for name in needed if not (root / DATA_FOLDERS[name]).is_dir()]
    if absent:
        problems.append("data not found: " + ", ".join(absent))
    return "; ".join(problems) or None


def build_model(spec: dict[str, Any]):
    import lightning_hyper.models as models

    return getattr(models, spec["class"])(**spec.get("init", {}))


def build_callbacks(specs: list[dict[str, Any]]) -> list:
    import lightning_hyper.callbacks as callbacks

    return [getattr(callbacks, s["class"])(**s.get("init", {})) for s in specs or []]


def build_data(group: dict[str, Any], root: Path):
    from lightning_hyper.data import CIFAR10DataModule, CIFAR100DataModule

    cls = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule}[group["dataset"]]
    return cls(root=str(root), batch_size=int(group["batch_size"]), num_workers=int(group.get("num_workers", 4)),
               pin_memory=True, if_missing="error", **group.get("data", {}))


def run_arm(group: dict[str, Any], arm: str, seed: int, device: str, root: Path) -> float:
    """Train one arm with one seed; the test metric (``group["metric_key"]``, in %)."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    model = build_model(group["model"] if arm not in group.get("models", {}) else group["models"][arm])
    limits = {"max_steps": int(group["max_steps"])} if "max_steps" in group else {"max_epochs": int(group["epochs"])}
    trainer = L.Trainer(accelerator="gpu", devices=[torch.device(device).index or 0], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=build_callbacks(group["arms"][arm]), **limits)
    dm = build_data(group, root)
    trainer.fit(model, datamodule=dm)
    acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    return 100.0 * (1.0 - acc) if group.get("metric_key", "error") == "error" else 100.0 * acc


def run(
    full: dict[str, Any], seeds: list[int], device: str, root: Path
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{group: {arm: {metric key: [per seed]}}}`` for every setting of ``full["groups"]``."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, group in full["groups"].items():
        key = group.get("metric_key", "error")
        out[name] = {arm: {key: []} for arm in group["arms"]}
        for seed in seeds:
            for arm in group["arms"]:
                t0 = time.perf_counter()
                value = run_arm(group, arm, seed, device, root)
                out[name][arm][key].append(value)
                print(f"  {name} {arm} seed {seed}: {key} {value:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out
