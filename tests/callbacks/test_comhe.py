"""CoMHERegularizer on real Trainers with plain LightningModules (tests/callbacks/helpers.py)."""
from __future__ import annotations

import math
import zlib

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_hyper.callbacks import CoMHERegularizer
from lightning_hyper.functional import (
    angle_preservation_loss,
    compressive_energy,
    hyperspherical_energy,
    projection_generator,
    random_projections,
)
from tests.callbacks.helpers import PlainNet, WeightsAtBatchStart, make_loader, trainer

IN, HIDDEN = 40, 48  # neuron dimensions 40 (fc1) and 48 (fc2) > projection_dim: both layers are projected
K = 8
PROJECTIONS = ["random", "angle_preserving", "adversarial", "group"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls run 10-50x slower with 2 threads on a loaded 2-core box (spec §6): use 1 here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def net(**kw) -> PlainNet:
    return PlainNet(in_features=IN, hidden=HIDDEN, **kw)


def loader(**kw):
    return make_loader(in_features=IN, **kw)


def fit(model, tmp_path, callbacks=(), ckpt_path=None, data=None, **kw):
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, data if data is not None else loader(), ckpt_path=ckpt_path)
    return t


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def collapse(model, seed=0):
    """Spec §10.11: hidden neurons u + 0.5 xi, clustered around one direction (HS energy ~1.4)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            n, d = layer.weight.shape
            u = torch.randn(1, d, generator=g)
            layer.weight.copy_((u + 0.5 * torch.randn(n, d, generator=g)) / math.sqrt(d))


def comhe(projection="random", **kw) -> CoMHERegularizer:
    kw.setdefault("projection_dim", K)
    return CoMHERegularizer(projection=projection, **kw)


def true_energies(model):
    return [hyperspherical_energy(m.weight.detach(), half_space=m is not model.out).item()
            for m in (model.fc1, model.fc2, model.out)]


# ------------------------------------------------------------------ logging and the claim
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_logs_both_energies_and_lowers_true_energy(tmp_path, projection):
    def run(callbacks):
        L.seed_everything(1)
        model = net(lr=0.05)
        collapse(model)
        t = fit(model, tmp_path, callbacks, max_steps=20)
        return model, t

    base, _ = run([])
    seen = WeightsAtBatchStart()
    model, t = run([comhe(projection, full_energy_every=1), seen])
    metrics = t.callback_metrics
    expected = {"comhe/penalty"} | {f"comhe/{k}/{n}" for k in ("energy", "full_energy") for n in ("fc1", "fc2", "out")}
    assert expected <= set(metrics)
    # the logged full energy is the unprojected half-space energy of the weights the last step started
    # from (not the full-space energy, 1 % away, nor that of the weights after the last update)
    w = seen.params["fc1.weight"].double()
    logged = metrics["comhe/full_energy/fc1"].item()
    assert logged == pytest.approx(hyperspherical_energy(w, half_space=True).item(), rel=1e-5)
    assert logged != pytest.approx(hyperspherical_energy(w, half_space=False).item(), rel=2e-3)
    # the compressed energy differs from it (it is computed in the projected space)
    assert metrics["comhe/energy/fc1"].item() != pytest.approx(metrics["comhe/full_energy/fc1"].item(), rel=1e-3)
    reg, ref = true_energies(model), true_energies(base)
    assert all(r < b - 0.02 for r, b in zip(reg, ref)), (projection, reg, ref)
    assert "training_step" not in model.__dict__


def test_full_energy_logging_period(tmp_path):
    t = fit(net(), tmp_path, [comhe(full_energy_every=0)], max_steps=2)
    assert "comhe/energy/fc1" in t.callback_metrics and "comhe/full_energy/fc1" not in t.callback_metrics


# ------------------------------------------------------------------ hand-written reference
class HandNet(PlainNet):
    """Eq. 6.4 by hand: loss + hw * sum_hidden agg_c E_hs(W P_c^T) + ow * E_full(W_out)."""

    def __init__(self, projections, hw, ow, aggregate="mean", **kw):
        super().__init__(in_features=IN, hidden=HIDDEN, **kw)
        self.projections = projections  # step -> {D: (C, k, D)}
        self.hw, self.ow, self.aggregate = hw, ow, aggregate

    def extra_loss(self, batch):
        draws = self.projections(self.global_step)
        hidden = sum(compressive_energy(m.weight, draws[m.weight.shape[1]], aggregate=self.aggregate)
                     for m in (self.fc1, self.fc2))
        return self.hw * hidden + self.ow * hyperspherical_energy(self.out.weight)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_same_weights_as_hand_written_for_fixed_projection(tmp_path, mode, aggregate):
    kw = dict(max_steps=5, accumulate_grad_batches=2 if mode == "loss" else 1)
    L.seed_everything(0)
    model = net()
    cb = comhe(refresh_every=None, hidden_weight=2.0, output_weight=0.5, aggregate=aggregate, mode=mode, seed=4)
    fit(model, tmp_path, [cb], **kw)
    fixed = {40: cb.state_dict()["drawn"]["dim=40"], 48: cb.state_dict()["drawn"]["dim=48"]}
    assert fixed[40].shape == (5, K, 40)  # C = 5 by default for random projections
    L.seed_everything(0)
    ref = HandNet(lambda step: fixed, 2.0, 0.5, aggregate)
    fit(ref, tmp_path, **kw)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    L.seed_everything(0)
    plain = net()
    fit(plain, tmp_path, **kw)
    assert not torch.allclose(params(plain), params(ref), atol=1e-4)  # the penalty did change training


class HandAPNet(PlainNet):
    """AP-CoMHE unrolled by hand (spec §4): per step, one plain-SGD step on each layer's P (W fixed),
    then the energy at P' = P - eta grad_P L_P(P, W) kept in the graph."""

    def __init__(self, p0, lr_p, eta, **kw):
        super().__init__(in_features=IN, hidden=HIDDEN, **kw)
        self.p = dict(p0)
        self.lr_p, self.eta = lr_p, eta

    def extra_loss(self, batch):
        from lightning_hyper.functional import angle_preserving_step, unrolled_angle_projection

        total = 10.0 * hyperspherical_energy(self.out.weight)
        for name in ("fc1", "fc2"):
            w = getattr(self, name).weight
            self.p[name] = angle_preserving_step(w, self.p[name], lr=self.lr_p, steps=1, weight_decay=5e-7)
            total = total + compressive_energy(w, unrolled_angle_projection(w, self.p[name], lr=self.eta))
        return total


def test_angle_preserving_matches_hand_written_unrolled_run(tmp_path):
    L.seed_everything(0)
    model = net()
    cb = comhe("angle_preserving", projection_lr=0.3, unroll_lr=0.2, seed=3)
    fit(model, tmp_path, [cb], max_steps=4)
    init = comhe("angle_preserving", seed=3)
    p0 = {name: init._learned_projection(name, d, 0, torch.device("cpu"), torch.float32)
          for name, d in (("fc1", IN), ("fc2", HIDDEN))}
    L.seed_everything(0)
    ref = HandAPNet(p0, 0.3, 0.2)
    fit(ref, tmp_path, max_steps=4)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(cb.state_dict()["learned"][name], ref.p[name], rtol=1e-5, atol=1e-6)


def test_projections_redrawn_every_step_match_documented_seeding(tmp_path):
    """refresh_every=1: the projections in force at step t are random_projections(C, k, D,
    generator=projection_generator(seed, t, 1, 1, D, 0)), shared by all layers of that D."""
    seed = 11

    def draws(step):
        return {d: random_projections(5, K, d, generator=projection_generator(seed, step, 1, 1, d, 0))
                for d in (40, 48)}

    L.seed_everything(0)
    model = net()
    cb = comhe(seed=seed, output_weight=1.0)
    fit(model, tmp_path, [cb], max_steps=4)
    L.seed_everything(0)
    ref = HandNet(draws, 1.0, 1.0)
    fit(ref, tmp_path, max_steps=4)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.projections_at(3, 40), draws(3)[40])
    assert not torch.equal(draws(2)[40], draws(3)[40])


def test_refresh_schedule_and_sharing_by_dimension():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(40, 48), nn.Linear(48, 48), nn.Linear(48, 48)
            self.out = nn.Linear(48, 3)

    model = Deep()
    shared = comhe(refresh_every=3, output_weight=0.0)
    shared.layers = shared.selection.resolve(model)
    seen = []
    for step in range(7):
        for layer in shared.layers[:3]:
            shared.layer_terms(layer, None, step)
        seen.append({k: v.clone() for k, v in shared._drawn.items()})
        assert set(seen[-1]) == {"dim=40", "dim=48"}  # fc2 and fc3 (D=48) use one draw
    for step in range(1, 7):
        same = step % 3 != 0
        assert torch.equal(seen[step]["dim=48"], seen[step - 1]["dim=48"]) == same
    assert seen[0]["dim=48"].shape[-1] == 48 and seen[0]["dim=40"].shape[-1] == 40
    own = comhe(share_projection=False, output_weight=0.0)
    own.layers = own.selection.resolve(model)
    for layer in own.layers[:3]:
        own.layer_terms(layer, None, 0)
    assert set(own._drawn) == {"fc1", "fc2", "fc3"}
    assert not torch.equal(own._drawn["fc2"], own._drawn["fc3"])
    torch.testing.assert_close(own._drawn["fc3"], random_projections(
        5, K, 48, generator=projection_generator(0, 0, 1, 1, 48, zlib.crc32(b"fc3") + 1)))


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    def run(seed, projection="random"):
        L.seed_everything(0)
        model = net()
        fit(model, tmp_path, [comhe(projection, seed=seed, group_mode="stochastic", group_size=8)], max_steps=4)
        return params(model)

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.allclose(run(3), run(4))
    torch.testing.assert_close(run(3, "group"), run(3, "group"), rtol=0, atol=0)
    assert not torch.allclose(run(3, "group"), run(4, "group"))


# ------------------------------------------------------------------ checkpoint / resume
class _SaveAtStep(Callback):
    """``trainer.save_checkpoint`` inside the loop, after the optimizer step that reaches ``step``.

    (Lightning 2.6 resumes a checkpoint written by ``save_checkpoint`` *after* ``fit`` returned one
    batch off: it replays the first batch of the next epoch. Saving in ``on_train_batch_end``, as
    ``ModelCheckpoint(every_n_train_steps=...)`` does, resumes exactly.)
    """

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_resume_continues_like_uninterrupted_run(tmp_path, projection):
    kw = dict(seed=5, group_mode="stochastic", group_size=8, projection_lr=0.5)
    data = dict(n=32, batch_size=8)  # 4 steps per epoch: N = 4 ends an epoch
    L.seed_everything(0)
    straight = net()
    cb_straight = comhe(projection, **kw)
    fit(straight, tmp_path / "a", [cb_straight], data=loader(**data), max_steps=8)

    L.seed_everything(0)
    first = net()
    cb_first = comhe(projection, **kw)
    ckpt = tmp_path / "half.ckpt"
    fit(first, tmp_path / "b", [cb_first, _SaveAtStep(4, ckpt)], data=loader(**data), max_steps=4)

    L.seed_everything(99)  # a different init and a callback with another seed: the checkpoint decides
    resumed = net()
    cb_resumed = comhe(projection, **{**kw, "seed": 6})
    fit(resumed, tmp_path / "c", [cb_resumed], data=loader(**data), max_steps=8, ckpt_path=ckpt)

    torch.testing.assert_close(params(resumed), params(straight), rtol=0, atol=0)
    a, b = cb_resumed.state_dict(), cb_straight.state_dict()
    assert a["seed"] == b["seed"] == 5 and a["last_update_step"] == b["last_update_step"]
    for field in ("learned", "drawn"):
        assert set(a[field]) == set(b[field])
        for key in a[field]:
            assert torch.equal(a[field][key], b[field][key]), (field, key)
    if projection in ("angle_preserving", "adversarial"):
        assert b["last_update_step"] == 7 and set(b["learned"]) == {"fc1", "fc2"}  # per layer by default
        # the stored P is the learned one: it differs from its N(0, 1) initial draw
        init = CoMHERegularizer(projection=projection, projection_dim=K, seed=5)
        p0 = init._learned_projection("fc1", IN, 0, torch.device("cpu"), torch.float32)
        assert not torch.allclose(b["learned"]["fc1"], p0)


def test_angle_preserving_state_is_the_learned_projection(tmp_path):
    """The P kept in state after training preserves the final weights' angles better than its init."""
    L.seed_everything(0)
    model = net()
    cb = comhe("angle_preserving", projection_lr=1.0, projection_steps=5, seed=2)
    fit(model, tmp_path, [cb], max_steps=8)
    p = cb.state_dict()["learned"]["fc1"]
    init = comhe("angle_preserving", seed=2)._learned_projection("fc1", IN, 0, torch.device("cpu"), torch.float32)
    w = model.fc1.weight.detach()
    assert angle_preservation_loss(w, p).item() < angle_preservation_loss(w, init).item()


def test_load_state_with_other_projection_is_an_error():
    with pytest.raises(ValueError, match="projection='random'"):
        comhe("angle_preserving").load_state_dict(comhe("random").state_dict())


# ------------------------------------------------------------------ small layers, groups
def test_small_layers_fall_back_to_plain_half_space_mhe(tmp_path):
    model = PlainNet(in_features=12, hidden=16)  # D = 12, 16 <= projection_dim = 30
    cb = CoMHERegularizer(full_energy_every=1)
    t = fit(model, tmp_path, [cb], data=make_loader(), max_steps=1)
    m = t.callback_metrics
    assert m["comhe/energy/fc1"].item() == pytest.approx(m["comhe/full_energy/fc1"].item(), rel=1e-6)
    cb.layers = cb.selection.resolve(model)
    torch.testing.assert_close(cb.layer_terms(cb.layers[1], None, 0)["penalty"],
                               hyperspherical_energy(model.fc2.weight, half_space=True))


def test_group_projection_groups_input_channels_of_convs():
    conv = nn.Conv2d(20, 6, 3, bias=False)  # 20 input channels, group_size 8 -> channels 0-7, 8-15, 16-19
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6, 3))
    cb = CoMHERegularizer(projection="group", group_size=8, output_weight=0.0)
    cb.layers = cb.selection.resolve(model)
    got = cb.layer_terms(cb.layers[0], None, 0)["energy"]
    w = conv.weight.detach()
    ref = sum(hyperspherical_energy(w[:, a:a + 8].reshape(6, -1), half_space=True) for a in (0, 8, 16)) / 3
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    few = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6, 3))  # RGB: one group = HS-MHE
    cb.layers = cb.selection.resolve(few)
    assert cb.layer_terms(cb.layers[0], None, 0)["energy"].item() == pytest.approx(
        hyperspherical_energy(few[0].weight.detach().reshape(6, -1), half_space=True).item(), rel=1e-6)


# ------------------------------------------------------------------ DDP
class _SaveRank(Callback):
    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CoMHERegularizer))
        torch.save({"params": params(pl_module), "drawn": cb.state_dict()["drawn"]},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.timeout(300)
def test_ddp_spawn_ranks_draw_identical_projections(tmp_path, monkeypatch):
    """gradient mode adds each rank's own penalty gradient after the all-reduce: the replicas stay
    identical only if every rank drew the same projections."""
    from tests.distributed import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    L.seed_everything(0)
    model = net()
    fit(model, tmp_path, [comhe(mode="gradient", seed=7), _SaveRank(tmp_path)], max_steps=3,
        strategy="ddp_spawn", devices=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])
    assert set(r0["drawn"]) == {"dim=40", "dim=48"}
    assert all(torch.equal(r0["drawn"][k], r1["drawn"][k]) for k in r0["drawn"])


# ------------------------------------------------------------------ configs
CONFIGS = ["mnist1d_comhe", "cifar10_resnet20_comhe", "cifar100_cnn6_comhe", "cifar100_cnn9_comhe",
           "cifar100_cnn15_comhe"]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_build_and_regularize(name):
    """Each config parses with the CLI and its CoMHERegularizer regularizes the configured network
    (the CIFAR data are not needed to build it; the first conv, D = 27 or 5, falls back to HS-MHE)."""
    from pathlib import Path

    from lightning_hyper.cli import run_cli

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cli = run_cli(["--config", str(path), "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, CoMHERegularizer))
    assert (cb.projection, cb.projection_dim, cb.num_projections, cb.half_space) == ("random", 30, 5, True)
    cb.layers = cb.selection.resolve(cli.model)
    hidden = [ref for ref in cb.layers if ref.role == "hidden"]
    first = cb.layer_terms(hidden[0], None, 0)
    torch.testing.assert_close(first["energy"], hyperspherical_energy(hidden[0].neurons().detach(), half_space=True))
    deep = cb.layer_terms(hidden[-1], None, 0)  # D > 30: projected
    assert deep["energy"].item() != pytest.approx(deep["full_energy"].item(), rel=1e-4)
    assert [ref.name for ref in cb.layers if ref.role == "output"] == ["head"]


def test_claims_benchmark_smoke(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "comhe_claims.py"
    spec = importlib.util.spec_from_file_location("comhe_claims", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke"])
    torch.set_num_threads(1)  # main() sets the thread count; keep this module's setting
    out = capsys.readouterr().out
    assert "comhe_rp" in out and "baseline" in out and "RP/MHE" in out


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,word", [
    ({"projection": "gaussian"}, "projection="), ({"aggregate": "median"}, "aggregate"),
    ({"projection_dim": 0}, "projection_dim"), ({"projection_dim": 2.5}, "projection_dim"),
    ({"num_projections": 0}, "num_projections"), ({"refresh_every": 0}, "refresh_every"),
    ({"share_projection": "yes"}, "share_projection"), ({"projection_mode": "joint"}, "projection_mode"),
    ({"projection_lr": -0.1}, "projection_lr"), ({"unroll_lr": "auto"}, "unroll_lr"),
    ({"unroll_steps": 0}, "unroll_steps"), ({"angle_loss": "l1"}, "angle_loss"),
    ({"group_size": 0}, "group_size"), ({"group_mode": "random"}, "group_mode"),
    ({"small_layer_fallback": "skip"}, "small_layer_fallback"), ({"hidden_weight": -1.0}, "hidden_weight"),
    ({"output_weight": float("inf")}, "output_weight"), ({"metric": "cosine"}, "metric"), ({"s": -2}, "s="),
    ({"mode": "hook"}, "mode"), ({"reinit_every": 0}, "reinit_every"), ({"projection_steps": -1}, "projection_steps"),
    ({"full_energy_every": -1}, "full_energy_every"), ({"zero_norm": "skip"}, "zero_norm"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        CoMHERegularizer(**kwargs)
    assert "accepted" in str(err.value)


def test_defaults_follow_the_spec():
    rp = CoMHERegularizer()
    assert (rp.projection_dim, rp.num_projections, rp.refresh_every, rp.aggregate, rp.share_projection,
            rp.half_space, rp.hidden_weight, rp.output_weight) == (30, 5, 1, "mean", True, True, 1.0, 10.0)
    ap = CoMHERegularizer(projection="ap")  # the spec's short names are aliases
    assert (ap.projection, ap.num_projections, ap.share_projection, ap.projection_steps,
            ap.projection_update_every) == ("angle_preserving", 1, False, 1, 1)
    alt = CoMHERegularizer(projection="angle_preserving", projection_mode="alternating")
    assert alt.projection_update_every == 10
    adv = CoMHERegularizer(projection="adv")
    assert (adv.projection, adv.projection_steps, adv.num_projections) == ("adversarial", 10, 1)


def test_tied_lr_outside_a_trainer_is_a_clear_error():
    model = net()
    cb = comhe("angle_preserving")
    cb.layers = cb.selection.resolve(model)
    with pytest.raises(ValueError, match="projection_lr='tied'"):
        cb.layer_terms(cb.layers[0], None, 0)


# ---------------------------------------------------------------- projection options: one object
from lightning_hyper.callbacks import CoMHEProjection  # noqa: E402
from lightning_hyper.callbacks.comhe import FLAT_NAMES  # noqa: E402

RESOLVED = ("projection", "projection_dim", "num_projections", "refresh_every", "aggregate", "share_projection",
            "projection_mode", "projection_steps", "projection_update_every", "projection_lr", "unroll_lr",
            "unroll_steps", "projection_weight_decay", "angle_loss", "reinit_every", "group_size", "group_mode",
            "small_layer_fallback")


def _resolved(cb):
    return {name: getattr(cb, name) for name in RESOLVED}


@pytest.mark.parametrize("kind,flat", [
    ("random", dict(projection_dim=K, num_projections=3, refresh_every=None, aggregate="max",
                    share_projection=False, small_layer_fallback="project")),
    ("ap", dict(projection_dim=K, projection_mode="alternating", projection_steps=3, projection_update_every=2,
                projection_lr=0.5, unroll_lr=0.1, unroll_steps=2, projection_weight_decay=1e-4, angle_loss="cos_sq",
                reinit_every=7)),
    ("group", dict(group_size=4, group_mode="stochastic", refresh_every=3)),
])
def test_flat_arguments_are_deprecated_and_equal_to_the_options_object(kind, flat):
    with pytest.warns(DeprecationWarning) as caught:
        old = CoMHERegularizer(projection=kind, **flat)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    for name in flat:  # one warning per flat argument, naming it and its new place
        assert any(f"CoMHERegularizer({name}=" in m and f"CoMHEProjection({FLAT_NAMES[name]}=" in m
                   for m in messages), name
    options = CoMHEProjection(kind=kind, **{FLAT_NAMES[k]: v for k, v in flat.items()})
    new = CoMHERegularizer(projection=options)
    assert _resolved(new) == _resolved(old)
    assert new.projection_options == old.projection_options and new.projection_options is not options
    # and the same penalty on the same weights (random draws from the same seed)
    model = net()
    for cb in (old, new):
        cb.layers = cb.selection.resolve(model)
    if kind != "ap":  # (angle-preserving with a tied lr needs a trainer)
        torch.testing.assert_close(new.penalty(model, log=False), old.penalty(model, log=False))


def test_projection_options_defaults_names_and_errors():
    assert _resolved(CoMHERegularizer()) == _resolved(CoMHERegularizer(projection=CoMHEProjection()))
    assert CoMHEProjection("ap").kind == "angle_preserving"
    ap = CoMHERegularizer(projection=CoMHEProjection("adv"))
    assert (ap.projection, ap.projection_steps, ap.num_projections, ap.share_projection) == ("adversarial", 10, 1,
                                                                                           False)
    with pytest.raises(ValueError, match=r"CoMHEProjection: steps=-1 is not supported; accepted values: None or an "
                                         r"int >= 0"):
        CoMHEProjection(steps=-1)
    with pytest.raises(ValueError, match=r"CoMHEProjection: kind='pca' is not supported; accepted values: 'random'"):
        CoMHEProjection(kind="pca")
    with pytest.raises(ValueError, match=r"CoMHEProjection: shared='yes' is not supported"):
        CoMHEProjection(shared="yes")
    with pytest.raises(ValueError, match=r"projection_dim=10 is not supported; accepted values: not together with "
                                         r"projection=CoMHEProjection\(...\).*projection_dim -> projection_dim"):
        CoMHERegularizer(projection=CoMHEProjection(), projection_dim=10)
    with pytest.raises(ValueError, match=r"projection=3 is not supported; accepted values: a CoMHEProjection"):
        CoMHERegularizer(projection=3)
    with pytest.raises(TypeError):
        CoMHERegularizer("random", 30)  # everything after projection is keyword-only (no silent shift)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoMHERegularizer(projection="ap", every_n_steps=2)  # the new form warns about nothing
