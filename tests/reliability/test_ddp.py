"""Issue 8, part 1: every callback family under Lightning DDP on CPU (``ddp_spawn``, 2 processes, gloo).

After training, the model replicas of both ranks are bit-identical (parameters and every buffer that
is not a running statistic of the local batch: OPT's V and S-OPT indices included), the callbacks'
own state agrees, and every value the callbacks log on a step equals the mean over the ranks of the
values they computed (``sync_dist``). The label-dependent penalties (MHE ``output_mode="labels"``,
DH2L ``pairs="batch"``) differ between the ranks' batches, so those checks can fail. Data come in
the DataModules' shuffled order (``EpochShuffleSampler``), which Lightning shards with a shuffling
``DistributedSampler``. Every callback refuses FSDP1 and DeepSpeed (FSDP2: tests/callbacks/test_fsdp.py) at the start of
fit with an error naming the supported ones, and the shipped modules (OPT layers included) and the
callbacks survive the pickling that ``ddp_spawn`` needs.

Each rank writes what it saw to ``tmp_path/rank{r}.pt`` in ``on_train_end`` (with ``ddp_spawn``
only rank 0's model comes back to the test process); the test compares the files.
"""
from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hyper.callbacks import MHERegularizer
from tests.callbacks.helpers import PlainNet, trainer
from tests.distributed import LogRecorder, free_port
from tests.reliability.families import (
    FAMILIES,
    assert_same_state,
    loader,
    make,
    penalty_callback,
    replica,
)

STEPS = 4


class RankRecorder(LogRecorder):
    """Records, per rank, the raw value of every ``self.log`` call of the callbacks (before the
    cross-rank reduction), the value the trainer then holds in ``callback_metrics``, and the final
    replica and callback states."""

    PREFIXES = ("mhe/", "monitor/", "comhe/", "dh2l/", "orthogonal/", "orthogonality/")

    def __init__(self, folder) -> None:
        super().__init__(folder, self.PREFIXES)

    def on_train_end(self, trainer, pl_module):
        states = {type(c).__name__: c.state_dict() for c in trainer.callbacks if c is not self}
        sampler = trainer.train_dataloader.sampler
        torch.save({"replica": replica(pl_module), "states": states, "raw": self.raw, "logged": self.logged,
                    "sync": self.sync, "world_size": trainer.world_size,
                    "sampler": (type(sampler).__name__, getattr(sampler, "shuffle", None))},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


def run_ddp(tmp_path, monkeypatch, family: str, mode: str):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # no clash with an earlier (TIME_WAIT) group
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    L.seed_everything(0, verbose=False)
    model, cbs = make(family, mode=mode)
    t = trainer(tmp_path, max_steps=STEPS, callbacks=[*cbs, RankRecorder(tmp_path)], strategy="ddp_spawn",
                devices=2, log_every_n_steps=1)
    t.fit(model, loader(shuffled=True))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


# (family, mode): label-dependent penalties in "gradient" mode add each rank's own penalty gradient
# after DDP's all-reduce, so they are the hard case for identical replicas
CASES = [("mhe", "gradient"), ("comhe", "loss"), ("hierarchical", "gradient"), ("orthogonal", "loss"),
         ("dcnet", "auto")]
assert sorted({f for f, _ in CASES}) == sorted(FAMILIES)


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,mode", CASES)
def test_ddp_spawn_replicas_identical_and_logs_synced(tmp_path, monkeypatch, family, mode):
    r0, r1 = run_ddp(tmp_path, monkeypatch, family, mode)
    assert r0["world_size"] == r1["world_size"] == 2
    # the DataModules' EpochShuffleSampler is a RandomSampler: Lightning shards it with a shuffling DistributedSampler
    assert r0["sampler"] == r1["sampler"] == ("DistributedSampler", True)
    # bit-identical replicas
    assert r0["replica"].keys() == r1["replica"].keys()
    for key in r0["replica"]:
        assert torch.equal(r0["replica"][key], r1["replica"][key]), f"{family}: {key} differs between ranks"
    # the same callback state on both ranks (CoMHE's learned P, S-OPT episodes, projection counters)
    assert r0["states"].keys() == r1["states"].keys()
    for name in r0["states"]:
        assert_same_state(r0["states"][name], r1["states"][name])
    if family == "dcnet":
        assert r0["states"]["WeightProjection"]["num_projections"] == STEPS // 2
        return
    if family == "orthogonal":
        assert r0["states"]["SOPTResampler"]["episodes"] == STEPS // 2  # re-drawn after steps 2 and 4
    # every logged step value = mean over the ranks of the raw values, on both ranks
    assert r0["raw"].keys() == r1["raw"].keys() and r0["raw"]
    differs = False
    for name in r0["raw"]:
        a, b = r0["raw"][name], r1["raw"][name]
        assert len(a) == len(b) == len(r0["logged"][name]) == STEPS, name
        assert r0["sync"][name] and r1["sync"][name], f"{name} is logged without sync_dist"
        for step in range(STEPS):
            mean = (a[step] + b[step]) / 2
            assert r0["logged"][name][step] == pytest.approx(mean, rel=1e-6), (name, step)
            assert r1["logged"][name][step] == pytest.approx(mean, rel=1e-6), (name, step)
        differs |= any(x != pytest.approx(y, rel=1e-6) for x, y in zip(a, b))
    if family in ("mhe", "hierarchical"):  # penalties of each rank's own labels: the check above has teeth
        assert differs


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["opt_ogd_sopt", "sphereface"])
def test_ddp_spawn_shipped_modules_stay_identical(tmp_path, monkeypatch, name):
    """Shipped modules with their own machinery: OPTClassifier with OGD (rotations stepped by a second
    optimizer) and S-OPT re-drawn by an unseeded SOPTResampler (rank 0's seed is broadcast), and
    SphereFaceModule (λ schedule in the head) with the SphereFace+ MHE term of each rank's labels."""
    from tests.reliability.test_resume import MODULES

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    build, data, _, kw = MODULES[name]
    L.seed_everything(0, verbose=False)
    model, cbs = build()
    t = trainer(tmp_path, max_steps=STEPS, callbacks=[*cbs, RankRecorder(tmp_path)], strategy="ddp_spawn",
                devices=2, limit_val_batches=0, num_sanity_val_steps=0, **kw)
    t.fit(model, data())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["sampler"] == r1["sampler"] == ("DistributedSampler", True)
    for key in r0["replica"]:
        assert torch.equal(r0["replica"][key], r1["replica"][key]), f"{name}: {key} differs between ranks"
    for cb_name in r0["states"]:
        assert_same_state(r0["states"][cb_name], r1["states"][cb_name])
    for metric in r0["raw"]:
        assert r0["sync"][metric] and r1["sync"][metric], metric
        for step, (x, y) in enumerate(zip(r0["raw"][metric], r1["raw"][metric])):
            assert r0["logged"][metric][step] == r1["logged"][metric][step] == pytest.approx((x + y) / 2, rel=1e-6)
    if name == "opt_ogd_sopt":
        assert r0["states"]["SOPTResampler"]["episodes"] == STEPS // 2
    else:
        assert any(a != b for a, b in zip(r0["raw"]["mhe/penalty"], r1["raw"]["mhe/penalty"]))


# ------------------------------------------------------------------ sharded strategies are refused
def _sharded(name: str):
    if name == "FSDP":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy()
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed is not installed: the class is what counts


@pytest.mark.parametrize("strategy", ["FSDP", "DeepSpeed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_strategies_are_refused_by_every_callback(family, strategy):
    """Every callback of every family (penalties, EnergyMonitor, SOPTResampler, OrthogonalityMonitor,
    WeightProjection, WeightedGradients) refuses FSDP / DeepSpeed at the start of fit, naming the strategy,
    itself and the supported strategies."""
    model, cbs = make(family)
    assert penalty_callback(cbs) is not None or family == "dcnet"
    for cb in cbs:
        fake_trainer = types.SimpleNamespace(strategy=_sharded(strategy), world_size=1, callbacks=cbs)
        with pytest.raises(RuntimeError, match=strategy) as err:
            cb.setup(fake_trainer, model, "fit")
            cb.on_fit_start(fake_trainer, model)
        msg = str(err.value)
        assert type(cb).__name__ in msg
        assert "Supported strategies" in msg and "'ddp'" in msg and "'ddp_spawn'" in msg


# ------------------------------------------------------------------ ddp_spawn pickles the model and callbacks
@pytest.mark.parametrize("name", ["classifier", "sphereface", "opt_ogd_sopt", "graph", "pointcloud"])
def test_shipped_modules_and_callbacks_survive_pickling(name):
    """``ddp_spawn`` sends the LightningModule and the callbacks to its workers by pickling. OPT layers
    (torch parametrizations, which torch refuses to pickle) are rebuilt with the same weights and buffers."""
    import pickle

    from tests.reliability.test_resume import MODULES, _predict

    build, data, _, _ = MODULES[name]
    torch.manual_seed(0)
    model, cbs = build()
    clone, cbs_clone = pickle.loads(pickle.dumps((model, cbs)))
    assert [type(c) for c in cbs_clone] == [type(c) for c in cbs]
    a, b = model.state_dict(), clone.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    dm = data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(_predict(clone, batch), _predict(model, batch), rtol=0, atol=0)
    p = next(clone.parameters())
    with torch.no_grad():
        p.add_(1.0)  # the clone owns its tensors
    assert not torch.equal(p, next(model.parameters()))


# ------------------------------------------------------------------ the size of the averaged penalty gradient
HW, OW, LR = 2.0, 3.0, 0.05


class PenaltyOnlyNet(PlainNet):
    """Its own loss has a zero gradient, so one SGD step moves the weights by the penalty gradient alone."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self(x) * 0.0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class FirstStepRecorder(Callback):
    def __init__(self, folder) -> None:
        self.folder = str(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save({"labels": batch[1].clone(),
                    "before": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                   f"{self.folder}/start{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                   f"{self.folder}/end{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_ddp_penalty_gradient_is_the_mean_over_ranks(tmp_path, monkeypatch, mode):
    """One SGD step under DDP with a penalty of each rank's labels (SphereFace+ output term): the step equals
    -lr x the MEAN over the ranks of the hand-computed float64 penalty gradients (a sum would be twice as large)."""
    from lightning_hyper.functional import hyperspherical_energy, output_energy_from_labels
    from tests.reliability.families import CLASSES, HIDDEN, IN

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    L.seed_everything(0, verbose=False)
    model = PenaltyOnlyNet(in_features=IN, hidden=HIDDEN, classes=CLASSES)
    cb = MHERegularizer(hidden_weight=HW, output_weight=OW, output_mode="labels", mode=mode)
    t = trainer(tmp_path, max_steps=1, callbacks=[cb, FirstStepRecorder(tmp_path)], strategy="ddp_spawn", devices=2)
    t.fit(model, loader())
    starts = [torch.load(tmp_path / f"start{r}.pt") for r in (0, 1)]
    end = torch.load(tmp_path / "end0.pt")
    assert not torch.equal(starts[0]["labels"], starts[1]["labels"])  # each rank's own batch
    before = {k: v.double().requires_grad_() for k, v in starts[0]["before"].items()}
    grads = []
    for start in starts:
        hidden = sum(hyperspherical_energy(before[f"{n}.weight"]) for n in ("fc1", "fc2"))
        penalty = HW * hidden + OW * output_energy_from_labels(before["out.weight"], start["labels"])
        grads.append(dict(zip(before, torch.autograd.grad(penalty, list(before.values()), allow_unused=True))))
    for name in ("fc1.weight", "fc2.weight", "out.weight"):
        mean = (grads[0][name] + grads[1][name]) / 2
        step = end[name].double() - before[name].detach()
        assert not torch.allclose(grads[0][name], grads[1][name]) or name != "out.weight"
        torch.testing.assert_close(step, -LR * mean, rtol=1e-4, atol=1e-7)
