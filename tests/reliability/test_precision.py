"""Mixed and double precision (issue 8, guarantee 3).

* Every shipped config in ``configs/*.yaml`` runs through the CLI (``run_cli``) under
  ``precision="bf16-mixed"`` and ``"64-true"`` for two training batches (``fast_dev_run=2``, tiny
  batches and data) and finishes with finite weights that moved, weights of the precision's dtype,
  and finite logged metrics. CIFAR configs use their offline synthetic stand-in
  (``if_missing="synthetic"``) with a root that holds no CIFAR folder.
* Energies are computed with autocast disabled: every energy function gives the same float32
  value and gradient under ``torch.autocast("cpu", bfloat16)`` as without it, and bfloat16 inputs
  are promoted to float32; the energies the callbacks log during a ``bf16-mixed`` run equal the
  float32 energies of the same weights.
* The GradScaler path of ``mode="gradient"`` (``16-mixed``): a non-finite gradient makes the
  optimizer step skip without corrupting the weights, and the penalty gradient, added after
  unscaling, equals ``mode="loss"``. Run on CUDA where available (skipped otherwise), and on the CPU
  with an explicit ``MixedPrecision("16-mixed", "cpu", GradScaler("cpu"))`` plugin, which runs the
  same Lightning code path.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import sys
from glob import glob
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_hyper.callbacks import EnergyMonitor, HierarchicalRegularizer, MHERegularizer
from lightning_hyper.callbacks.hierarchical import hierarchical_penalty
from lightning_hyper.cli import run_cli
from lightning_hyper.functional import (
    as_neurons,
    compressive_energy,
    group_energy,
    grouped_metric_energy,
    hyperspherical_energy,
    metric_energy,
    metric_energy_from_labels,
    output_energy_from_labels,
    pairwise_angles,
)
from lightning_hyper.nn.hierarchical import HierarchicalLinear
from tests.callbacks.helpers import PlainNet, make_loader

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob(str(REPO / "configs" / "*.yaml")))
PRECISIONS = ("bf16-mixed", "64-true")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and pytest's own ``sys.argv`` are present."""
    monkeypatch.setattr(sys, "argv", ["lightning-hyper"])


# ------------------------------------------------------------------------ every config, both precisions
def _data_overrides(config: dict, tmp_path: Path) -> list[str]:
    """Shrink the config's DataModule (by the arguments its class accepts) and keep it offline."""
    module, name = config["data"]["class_path"].rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    shrink = {
        "batch_size": 16 if "num_pairs" in params else 8,
        "num_pairs": 20,  # open-set verification: 2 val batches of 16 cover all 10 folds
        "num_workers": 0,
        "pin_memory": False,
        "num_samples": 200,  # MNIST-1D
        "synthetic_size": 16,  # CIFAR stand-in: 16 training / 3 test images
    }
    out = [f"--data.init_args.{k}={v}" for k, v in shrink.items() if k in params]
    if "root" in params:
        if "if_missing" not in params:  # pragma: no cover - the CIFAR modules have it
            pytest.fail(f"{name} has a root but no offline fallback (if_missing)")
        out += [f"--data.init_args.root={tmp_path / 'no_dataset_here'}", "--data.init_args.if_missing=synthetic"]
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
@pytest.mark.usefixtures("one_thread")  # tiny models: two threads only contend
def test_every_config_trains_with_finite_weights(config, precision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    cfg = yaml.safe_load(open(config))
    args = [
        "--config", config,
        f"--trainer.precision={precision}",
        # two training and two validation batches; fast_dev_run swaps the logger for a DummyLogger that writes
        # nothing (no --trainer.logger=false: cifar10_resnet20_mhe's LearningRateMonitor needs a logger object)
        "--trainer.fast_dev_run=2",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
        *_data_overrides(cfg, tmp_path),
    ]
    kwargs = cfg["model"].get("init_args", {}).get("backbone_kwargs") or {}
    if "widths" in kwargs:  # a quarter of the channels: same layers and code paths, 10x less compute
        small = {**kwargs, "widths": [max(8, w // 4) for w in kwargs["widths"]]}
        args.append(f"--model.init_args.backbone_kwargs={json.dumps(small)}")
    cli = run_cli(args, run=False)
    model, trainer = cli.model, cli.trainer
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.fit(model, datamodule=cli.datamodule)

    assert trainer.global_step >= 1 and not trainer.interrupted
    want = torch.float64 if precision == "64-true" else torch.float32
    changed = False
    for name, p in model.named_parameters():
        assert p.dtype == want, f"{name}: {p.dtype} under precision={precision}"
        assert bool(torch.isfinite(p).all()), f"{name}: non-finite weights after {precision} training"
        if name in before and not torch.equal(p.detach().to(before[name].dtype), before[name]):
            changed = True
    assert changed, "no parameter changed: nothing was trained"
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert bool(torch.isfinite(buf).all()), f"buffer {name}: non-finite after {precision} training"
    for key, value in trainer.callback_metrics.items():
        assert bool(torch.isfinite(torch.as_tensor(value)).all()), f"logged {key} = {value}"


def test_every_config_is_covered():
    assert len(CONFIGS) >= 20  # the parametrization above found the shipped configs


# ------------------------------------------------------------------------------ energies ignore autocast
def _energy_cases() -> list[tuple[str, object]]:
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(3, 5, 24, generator=g)
    labels = torch.tensor([0, 3, 3, 7, 11])
    groups = torch.arange(12) % 4
    return [
        ("mhe euclidean s=2", lambda w: hyperspherical_energy(w)),
        ("mhe euclidean s=1 chunked", lambda w: hyperspherical_energy(w, s=1.0, chunk_size=5)),
        ("mhe log energy", lambda w: hyperspherical_energy(w, s=0.0)),
        ("mhe angular half-space", lambda w: hyperspherical_energy(w, metric="angular", half_space=True)),
        ("mhe angular pi units, chunked", lambda w: hyperspherical_energy(w, metric="angular", angle_unit="pi",
                                                                            chunk_size=4)),
        ("pairwise angles", lambda w: pairwise_angles(w)),
        ("output energy from labels", lambda w: output_energy_from_labels(w, labels)),
        ("CoMHE compressive energy", lambda w: compressive_energy(w, proj)),
        ("G-CoMHE group energy", lambda w: group_energy(w, group_width=8)),
        ("DH2L AMcos", lambda w: metric_energy(w, "AMcos")),
        ("DH2L HM'", lambda w: metric_energy(w, "HM'")),
        ("DH2L N-euclidean2", lambda w: metric_energy(w, "N-euclidean2")),
        ("DH2L from labels", lambda w: metric_energy_from_labels(w, labels, "GMcos")),
        ("DH2L grouped", lambda w: grouped_metric_energy(w, groups, "AM")),
    ]


@pytest.mark.parametrize("name, fn", _energy_cases(), ids=[c[0] for c in _energy_cases()])
def test_energies_are_float32_and_unchanged_under_bf16_autocast(name, fn):
    """Forward under autocast, backward outside it (as Lightning and the PyTorch AMP recipe do)."""
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(0))
    ref_leaf = w.clone().requires_grad_(True)
    ref = fn(ref_leaf)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_leaf)
    leaf = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (w @ w.T).dtype == torch.bfloat16  # autocast really is active here
        value = fn(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.equal(value, ref), f"{name}: {value} under autocast vs {ref}"
    assert torch.equal(grad, ref_grad)
    # bfloat16 neurons (e.g. bf16-true weights) are promoted: same as their float32 copy
    w16 = w.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        promoted = fn(w16)
    assert promoted.dtype == torch.float32
    assert torch.equal(promoted, fn(w16.float()))


@pytest.mark.parametrize("kw", [{}, {"chunk_size": 4}, {"metric": "angular", "half_space": True, "s": 0.0}])
def test_energy_core_backward_ignores_autocast_too(kw):
    """The energy core's custom backward also runs in float32 when .backward() is called inside autocast."""
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(0))
    ref_leaf = w.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(hyperspherical_energy(ref_leaf, **kw), ref_leaf)
    leaf = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (grad,) = torch.autograd.grad(hyperspherical_energy(leaf, **kw), leaf)
    assert grad.dtype == torch.float32 and torch.equal(grad, ref_grad)


def test_a_bf16_gram_matrix_would_change_the_energy():
    """Sensitivity of the checks here: the naive energy, whose Gram GEMM autocast runs in bfloat16, is off by far
    more than the 2e-6 tolerance of the logged-energy test below."""
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))

    def naive(x):
        u = nn.functional.normalize(x, dim=1)
        g = (u @ u.T).float()
        off = ~torch.eye(16, dtype=torch.bool)
        return (1.0 / (2.0 - 2.0 * g[off] + 1e-6)).mean()

    e32 = naive(w)
    assert torch.allclose(e32, hyperspherical_energy(w), rtol=1e-5)  # the naive formula is the energy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e16 = naive(w)
    assert abs(float(e16 - e32)) > 10 * 2e-6 * float(e32)  # (about 7e-5 relative)


class _HierNet(PlainNet):
    def __init__(self) -> None:
        super().__init__(in_features=12, hidden=16, classes=6)
        self.out = HierarchicalLinear(16, hierarchy=[0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("family", ["mhe", "mhe_angular_half_space", "mhe_dh2l_metric", "hierarchical", "monitor"])
def test_logged_energies_under_bf16_mixed_equal_float32_energies(family, tmp_path):
    """One bf16-mixed step; penalties log the energies of the weights *before* the step, the monitor
    those *after* it. Each equals the float32 energy of the same weights, computed here without autocast."""
    torch.manual_seed(0)
    model = _HierNet() if family == "hierarchical" else PlainNet(in_features=12, hidden=16, classes=6)
    cb = {
        "mhe": lambda: MHERegularizer(hidden_weight=1.0, output_weight=1.0),
        "mhe_angular_half_space": lambda: MHERegularizer(metric="angular", half_space=True, s=1.0, hidden_weight=1.0),
        "mhe_dh2l_metric": lambda: MHERegularizer(metric="AMcos", hidden_weight=1.0),
        "hierarchical": lambda: HierarchicalRegularizer(weight=1.0, pairs="full", constraints=["C3"]),
        "monitor": lambda: EnergyMonitor(every_n_steps=1),
    }[family]()
    start = copy.deepcopy(model)
    trainer = L.Trainer(max_steps=1, precision="bf16-mixed", accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(model, make_loader(in_features=12, classes=6))
    metrics = trainer.callback_metrics
    if family == "monitor":
        expected = {f"monitor/energy/{n}": float(hyperspherical_energy(as_neurons(model.get_submodule(n)).detach()))
                    for n in ("fc1", "fc2", "out")}
    elif family == "hierarchical":
        terms = hierarchical_penalty(start.out.geometry(), None, "AMcos", 1.0, constraints=["C3"])
        expected = {f"dh2l/{k}/out": float(v) for k, v in terms.items() if k != "penalty"}
        expected["dh2l/penalty"] = float(terms["penalty"])
    else:  # written out here, independently of the callback's own energy()
        def energy(name):
            w = as_neurons(start.get_submodule(name)).detach()
            if family == "mhe_dh2l_metric":
                return float(metric_energy(w, "AMcos"))
            if family == "mhe_angular_half_space":  # A-MHE, half-space on hidden layers only
                return float(hyperspherical_energy(w, s=1.0, metric="angular", half_space=name != "out"))
            return float(hyperspherical_energy(w))
        expected = {f"mhe/energy/{n}": energy(n) for n in ("fc1", "fc2", "out")}
    assert set(expected) <= set(metrics), sorted(metrics)
    for key, value in expected.items():
        got = float(metrics[key])
        assert metrics[key].dtype == torch.float32
        assert math.isclose(got, value, rel_tol=2e-6, abs_tol=1e-7), f"{key}: logged {got} vs float32 {value}"
    # and the training step itself ran in bf16 (the check is not vacuous)
    assert trainer.precision == "bf16-mixed"


# ------------------------------------------------------------------- GradScaler path of mode="gradient"
class _InjectNonFinite(L.Callback):
    """Puts an Inf into one gradient after the backward of step ``at`` (before unscaling) and records the
    weights around every optimizer step."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []

    @staticmethod
    def _weights(pl_module):
        return {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._weights(pl_module))

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.at:
            pl_module.fc1.weight.grad[0, 0] = math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._weights(pl_module))
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


def _fp16_trainer(device: str, tmp_path, callbacks, steps: int) -> L.Trainer:
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    return L.Trainer(max_steps=steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                     plugins=[MixedPrecision("16-mixed", device, scaler=scaler)], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, callbacks=callbacks)


DEVICES = [
    pytest.param("cpu", id="cpu-emulated"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_gradient_mode_skips_a_nonfinite_step(device, tmp_path):
    torch.manual_seed(0)
    model = PlainNet(in_features=12, hidden=16, classes=6)
    spy = _InjectNonFinite(at=1)
    cb = MHERegularizer(mode="gradient", hidden_weight=1.0, output_weight=1.0)
    trainer = _fp16_trainer(device, tmp_path, [cb, spy], steps=3)
    trainer.fit(model, make_loader(in_features=12, classes=6))
    assert cb._active_mode == "gradient" and trainer.precision == "16-mixed"
    assert len(spy.after) == 3
    for step, (b, a) in enumerate(zip(spy.before, spy.after)):
        assert all(bool(torch.isfinite(v).all()) for v in a.values()), f"step {step}: corrupted weights"
        moved = any(not torch.equal(a[k], b[k]) for k in a)
        assert moved == (step != 1), f"step {step}: moved={moved}"
    assert spy.scales[1] == spy.scales[0] / 2  # the scaler saw the Inf and backed off


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_gradient_mode_adds_the_unscaled_penalty_gradient(device, tmp_path):
    """Under GradScaler, mode="gradient" (penalty gradient added after unscaling) trains exactly like
    mode="loss" (penalty scaled with the loss), and differently from no penalty."""
    finals = {}
    for mode in ("gradient", "loss", None):
        torch.manual_seed(0)
        model = PlainNet(in_features=12, hidden=16, classes=6)
        cbs = [MHERegularizer(mode=mode, hidden_weight=1.0, output_weight=1.0)] if mode else []
        _fp16_trainer(device, tmp_path, cbs, steps=3).fit(model, make_loader(in_features=12, classes=6))
        finals[mode] = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    assert torch.allclose(finals["gradient"], finals["loss"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(finals["gradient"], finals[None], rtol=1e-3, atol=1e-4)
