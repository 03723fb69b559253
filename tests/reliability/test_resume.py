"""Issue 8, part 2: checkpoint / resume.

For every callback family with state and every shipped LightningModule with schedules: a run that
is interrupted after N optimizer steps (the checkpoint written by ``ModelCheckpoint(every_n_train_steps=N)``,
then an exception at the start of step N) and resumed with ``ckpt_path`` to 2N steps ends exactly where
an uninterrupted 2N-step run ends: the same weights and buffers (OPT's V and S-OPT indices, the
SphereFace head's step counter), the same callback state (CoMHE's learned projections and update
step, S-OPT episodes, WeightProjection counters, EnergyMonitor batches), the same optimizer, OGD and
LR-scheduler state, and, step by step after N, the same batches, learning rate and SphereFace λ.
N is a multiple of the epoch length: Lightning restarts a plain DataLoader's epoch on resume, so
mid-epoch checkpoints only resume exactly with a stateful loader (Lightning warns about that).

The ``ModelCheckpoint`` file of each shipped module loads with ``Model.load_from_checkpoint`` and
predicts what the model predicted when the file was written; the CLI resumes with ``--ckpt_path``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_hyper.callbacks import MHERegularizer, SOPTResampler
from lightning_hyper.data import DigitsDataModule, KarateClubDataModule, OpenSetDataModule, SyntheticShapesDataModule
from lightning_hyper.models import (
    GraphClassifier,
    HypersphericalClassifier,
    OPTClassifier,
    PointCloudClassifier,
    SphereFaceModule,
)
from tests.reliability.families import FAMILIES, assert_same_state, loader, make

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupted(Exception):
    """Stands for a crash / preemption."""


class CrashAt(Callback):
    """Raise at the start of optimizer step ``step`` (after the checkpoint of step ``step`` was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted(f"interrupted at step {self.step}")


def _fingerprint(batch) -> float:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch.x
    return float(x.double().sum() + 0.5 * (torch.arange(x.shape[0]) + 1).double() @ x.flatten(1).double()[:, 0])


class Recorder(Callback):
    """Per optimizer step: which batch was used, the learning rate it used and (if the model has one) λ."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple] = {}
        self._lrs: tuple = ()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._lrs = tuple(g["lr"] for opt in trainer.optimizers for g in opt.param_groups)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran
        lam = getattr(getattr(pl_module, "head", None), "lambda_", None)  # set by the training step
        self.rows[step] = (_fingerprint(batch), self._lrs, lam)


def _trainer(tmp_path, max_steps, callbacks, **kw) -> L.Trainer:
    defaults = dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                    num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    defaults.update(kw)
    return L.Trainer(**defaults)


def _snapshot(trainer: L.Trainer, model, callbacks) -> dict:
    out = {"model": copy.deepcopy(model.state_dict()),
           "callbacks": {type(c).__name__: c.state_dict() for c in callbacks},
           "optimizers": [opt.state_dict() for opt in trainer.optimizers],
           "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
           "global_step": trainer.global_step}
    if getattr(model, "_ogd", None) is not None:
        out["ogd"] = model._ogd.state_dict()
    return out


def assert_resumes_exactly(tmp_path, build, data, n: int, **trainer_kw):
    """``build() -> (model, callbacks)``; ``data() -> dataloader or datamodule``. Returns the interrupted
    model, its checkpoint path and a fresh batch source (for prediction checks)."""
    # uninterrupted 2N steps
    L.seed_everything(0, verbose=False)
    model, cbs = build()
    rec = Recorder()
    straight_trainer = _trainer(tmp_path / "straight", 2 * n, [*cbs, rec], **trainer_kw)
    straight_trainer.fit(model, data())
    straight = _snapshot(straight_trainer, model, cbs)
    assert straight["global_step"] == 2 * n

    # interrupted after N steps, checkpoint written by ModelCheckpoint
    L.seed_everything(0, verbose=False)
    first, cbs = build()
    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=n, save_top_k=-1, filename="{step}")
    t = _trainer(tmp_path / "first", 2 * n, [*cbs, CrashAt(n), saver], enable_checkpointing=True, **trainer_kw)
    with pytest.raises(Interrupted):
        t.fit(first, data())
    ckpt = ckpt_dir / f"step={n}.ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [ckpt.name]

    # resumed to 2N from another initialization: the checkpoint decides
    L.seed_everything(123, verbose=False)
    resumed, cbs = build()
    L.seed_everything(0, verbose=False)  # the seed of the re-run (data order), as a rerun of the same config
    rec_resumed = Recorder()
    resumed_trainer = _trainer(tmp_path / "resumed", 2 * n, [*cbs, rec_resumed], **trainer_kw)
    resumed_trainer.fit(resumed, data(), ckpt_path=ckpt)
    after = _snapshot(resumed_trainer, resumed, cbs)

    assert after["global_step"] == 2 * n
    assert sorted(rec_resumed.rows) == list(range(n, 2 * n))
    for step, row in rec_resumed.rows.items():
        assert row == rec.rows[step], f"step {step}: (batch, lr, lambda) {row} != uninterrupted {rec.rows[step]}"
    assert after["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after["model"][key], value), f"{key} differs from the uninterrupted run"
        else:
            assert after["model"][key] == value, key  # e.g. the SphereFace head's step counter (extra state)
    for name in ("callbacks", "optimizers", "schedulers", "ogd"):
        assert (name in after) == (name in straight)
        if name in after:
            assert_same_state(after[name], straight[name])
    return first, ckpt


# ------------------------------------------------------------------ callback families (tiny models)
def _shuffled():
    return loader(shuffled=True)  # 32 samples, batches of 8: 4 steps per epoch


@pytest.mark.parametrize("family", FAMILIES)
def test_callback_families_resume_exactly(tmp_path, family):
    def build():
        return make(family, lr=0.05)

    assert_resumes_exactly(tmp_path, build, _shuffled, n=4)


@pytest.mark.parametrize("family,callback", [("mhe", "EnergyMonitor"), ("comhe", "CoMHERegularizer"),
                                             ("orthogonal", "SOPTResampler"), ("dcnet", "WeightProjection")])
def test_resume_check_fails_without_the_callback_state(tmp_path, monkeypatch, family, callback):
    """Mutation check: with a callback's ``load_state_dict`` made a no-op the resumed run differs, so
    the equality above really rests on the restored state (EnergyMonitor: its batch counter decides
    the logging steps; the others change the weights or their own state)."""
    _, cbs = make(family)
    cls = type(next(c for c in cbs if type(c).__name__ == callback))
    monkeypatch.setattr(cls, "load_state_dict", lambda self, state: None)
    with pytest.raises(AssertionError):
        assert_resumes_exactly(tmp_path, lambda: make(family, lr=0.05), _shuffled, n=4)


def test_resume_check_fails_with_global_rng_shuffling(tmp_path, monkeypatch):
    """Mutation check for the data modules: with ``DataLoader(shuffle=True)``'s global-RNG order (what
    they used before) the resumed run sees other batches than the uninterrupted one."""
    import lightning_hyper.data.sampling as sampling
    from torch.utils.data import RandomSampler

    monkeypatch.setattr(sampling, "epoch_sampler",
                        lambda ds, shuffle, seed=None: RandomSampler(ds) if shuffle else None)
    build, data, n, kw = MODULES["classifier"]
    with pytest.raises(AssertionError, match="step 3"):
        assert_resumes_exactly(tmp_path, build, data, n, **kw)


# ------------------------------------------------------------------ shipped LightningModules
def _classifier():
    model = HypersphericalClassifier(backbone="embedding_mlp", num_classes=10,
                                     backbone_kwargs={"in_features": 64, "hidden": [16], "embedding_dim": 8},
                                     lr=0.05, scheduler="step", step_size=1, gamma=0.5)
    return model, [MHERegularizer(neuron_batch_size=4)]


def _sphereface():
    model = SphereFaceModule(backbone="embedding_mlp", num_classes=7,
                             backbone_kwargs={"in_features": 64, "hidden": [16], "embedding_dim": 8},
                             head="asoftmax", head_kwargs={"m": 4, "lambda_min": 5.0}, lr=0.05,
                             lr_milestones=(0.5, 0.75), warm_start_steps=2, num_folds=2, n_thr=100)
    # SphereFace+: MHE over the classes of each batch
    return model, [MHERegularizer(hidden_weight=0.0, output_weight=1.0, output_mode="labels")]


def _opt():
    model = OPTClassifier(backbone="cnn6", num_classes=10,
                          backbone_kwargs={"in_channels": 1, "input_size": 8, "widths": [4, 4, 4], "fc_features": 8},
                          opt_method="ogd", opt_kwargs={"sopt": True, "seed": 0}, lr=0.05, scheduler="cosine",
                          max_epochs_for_cosine=4)
    return model, [SOPTResampler(every_n_steps=2)]  # seed=None: drawn once, kept in the callback state


def _graph():
    # dropout 0: Lightning does not checkpoint the global RNG, so dropout masks differ after a resume
    return GraphClassifier(34, 4, dropout=0.0, opt_method="cayley", opt_kwargs={"seed": 0}), []


def _pointcloud():
    model = PointCloudClassifier(backbone="pointnet", num_classes=3,
                                 backbone_kwargs={"widths": [8, 8, 8, 8, 16], "fc_widths": [16, 8], "dropout": 0.0,
                                                  "tnet_widths": [8, 8, 16], "tnet_fc_widths": [16, 8]},
                                 opt_method="householder", opt_kwargs={"seed": 0}, scheduler="step", step_size=1)
    return model, []


def _digits_flat():
    return DigitsDataModule(batch_size=32, flatten=True)


MODULES = {
    # name: (build, data, N, trainer kwargs); N = one epoch (limit_train_batches) except for the
    # one-batch graph
    "classifier": (_classifier, _digits_flat, 3, {"limit_train_batches": 3}),
    "sphereface": (_sphereface, lambda: OpenSetDataModule(dataset="digits", heldout_classes=(0, 1, 2), flatten=True,
                                                          batch_size=32, num_pairs=40, num_folds=2), 3,
                   {"limit_train_batches": 3}),
    "opt_ogd_sopt": (_opt, lambda: DigitsDataModule(batch_size=32), 2, {"limit_train_batches": 2}),
    "graph": (_graph, KarateClubDataModule, 3, {}),
    "pointcloud": (_pointcloud, lambda: SyntheticShapesDataModule(shapes=["sphere", "cube", "torus"], num_points=32,
                                                                  train_per_class=8, val_per_class=2, test_per_class=2,
                                                                  batch_size=8), 3, {}),
}


def _predict(model, batch):
    model.eval()
    with torch.no_grad():
        if isinstance(model, GraphClassifier):
            return model(batch.x, batch.edge_index)
        if isinstance(model, SphereFaceModule):
            return model.embed(batch[0])
        return model(batch[0])


@pytest.mark.parametrize("name", list(MODULES))
def test_shipped_modules_resume_exactly_and_load_from_checkpoint(tmp_path, name):
    build, data, n, kw = MODULES[name]
    first, ckpt = assert_resumes_exactly(tmp_path, build, data, n, **kw)
    # the ModelCheckpoint file loads with load_from_checkpoint and predicts what the model predicted then
    # (the interrupted model still holds the weights of step N: the crash came before step N ran)
    loaded = type(first).load_from_checkpoint(ckpt)
    dm = data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected, got = _predict(first, batch), _predict(loaded, batch)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.state_dict().keys() == first.state_dict().keys()


def test_sphereface_lambda_schedule_crosses_the_resume_point(tmp_path):
    """The λ rows compared above change across the checkpoint: warm start (λ = inf) until step 2, then the
    annealed schedule, and the LR milestone at 50% of the run falls on the first resumed step."""
    rec = Recorder()
    L.seed_everything(0, verbose=False)
    model, cbs = _sphereface()
    build, data, n, kw = MODULES["sphereface"]
    _trainer(tmp_path, 2 * n, [*cbs, rec], **kw).fit(model, data())
    lams = [rec.rows[s][2] for s in range(2 * n)]
    lrs = [rec.rows[s][1][0] for s in range(2 * n)]
    assert lams[:2] == [float("inf")] * 2 and all(lams[s] == model.head.lambda_at(s - 2) for s in range(2, 2 * n))
    assert lams[2] > lams[-1] > 5.0
    assert lrs[n - 1] == pytest.approx(0.05) and lrs[n] == pytest.approx(0.005)


# ------------------------------------------------------------------ CLI --ckpt_path
def _cli_config(tmp_path: Path, name: str, extra_callbacks: list) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "digits_mhe.yaml").read_text())
    cfg["trainer"].update(max_steps=6, limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0,
                          logger=False, default_root_dir=str(tmp_path / name), enable_model_summary=False)
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"] + extra_callbacks
    cfg["model"]["init_args"]["backbone_kwargs"]["widths"] = [4, 8, 8]
    cfg["data"]["init_args"]["batch_size"] = 32
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_resumes_with_ckpt_path(tmp_path):
    from lightning_hyper.cli import run_cli

    straight = run_cli(["fit", "--config", str(_cli_config(tmp_path, "straight", []))])
    assert straight.trainer.global_step == 6
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 3, "save_top_k": -1,
                           "filename": "{step}"}}
    crash = {"class_path": "tests.reliability.test_resume.CrashAt", "init_args": {"step": 3}}
    with pytest.raises(Interrupted):
        run_cli(["fit", "--config", str(_cli_config(tmp_path, "first", [saver, crash]))])
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    assert ckpt.is_file()
    resumed = run_cli(["fit", "--config", str(_cli_config(tmp_path, "resumed", [])), "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mhe = [c for c in resumed.trainer.callbacks if isinstance(c, MHERegularizer)]
    assert len(mhe) == 1 and "mhe/penalty" in resumed.trainer.callback_metrics
