"""HierarchicalRegularizer (DH2L 'H'), MHERegularizer with DH2L metrics ('E') and the DH2L configs."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_hyper.callbacks import HierarchicalRegularizer, MHERegularizer
from lightning_hyper.callbacks.hierarchical import hierarchical_penalty
from lightning_hyper.functional import pairwise_angles
from lightning_hyper.functional.discrete import METRICS, metric_energy, metric_energy_from_labels
from lightning_hyper.nn import HierarchicalLinear
from tests.callbacks.helpers import PlainNet, WeightsAtBatchStart, make_loader, trainer
from tests.functional.test_discrete import ref_metric

GROUPS = [0, 0, 0, 1, 1, 2, 2, 2]  # 8 classes in 3 super-classes
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def ref_term(a, b, metric):
    v = ref_metric(a, b, metric)
    return 1 - v if metric in METRICS and metric.rstrip("'") in ("bin", "ter", "angular", "AM", "GM", "HM") else v


def ref_penalty(layer: HierarchicalLinear, classes, metric, weight=0.1):
    """Eq. 5-7 with loops over the classes / groups present (float64)."""
    w = layer.weight.detach().double().numpy()
    c = layer.centers().detach().double().numpy()
    present = sorted(set(classes))
    groups = sorted({GROUPS[i] for i in present})
    within = []
    for g in groups:
        members = [i for i in present if GROUPS[i] == g]
        pairs = [ref_term(w[i], w[j], metric) for i in members for j in members if i != j]
        if pairs:
            within.append(np.mean(pairs))
    r_p = np.mean(within) if within else 0.0
    cpairs = [ref_term(c[a], c[b], metric) for a in groups for b in groups if a != b]
    r_c = np.mean(cpairs) if cpairs else 0.0
    return r_p, r_c, weight * (r_p + r_c)


@pytest.mark.parametrize("metric", ["AMcos", "bin", "HM'", "N-euclidean2"])
@pytest.mark.parametrize("classes", [None, [0, 2, 2, 3, 4, 7]])
def test_penalty_matches_loop_reference(metric, classes):
    layer = HierarchicalLinear(6, hierarchy=GROUPS).double()
    out = hierarchical_penalty(layer.geometry(), None if classes is None else torch.tensor(classes), metric, weight=0.3)
    r_p, r_c, total = ref_penalty(layer, range(8) if classes is None else classes, metric, 0.3)
    assert out["within"].item() == pytest.approx(r_p, rel=1e-6)
    assert out["between"].item() == pytest.approx(r_c, rel=1e-6)
    assert out["penalty"].item() == pytest.approx(total, rel=1e-6)


def test_within_and_between_weights():
    """R = lambda_l (within_weight R_p + between_weight R_c), through the function and the callback."""
    layer = HierarchicalLinear(6, hierarchy=GROUPS).double()
    r_p, r_c, _ = ref_penalty(layer, range(8), "HMcos")
    for wp, wc in ((2.0, 0.5), (1.0, 0.0), (0.0, 3.0)):
        out = hierarchical_penalty(layer.geometry(), None, "HMcos", weight=0.3, within_weight=wp, between_weight=wc)
        assert out["penalty"].item() == pytest.approx(0.3 * (wp * r_p + wc * r_c), rel=1e-6)
        assert out["within"].item() == pytest.approx(r_p, rel=1e-6)  # logged terms stay unweighted
    model = HierNet()
    cb = HierarchicalRegularizer(metric="AM", weight=0.2, within_weight=3.0, between_weight=0.25)
    cb.layers = cb.selection.resolve(model)
    batch = (torch.randn(4, 12), torch.tensor([0, 1, 3, 6]))
    r_p, r_c, _ = ref_penalty(model.out, [0, 1, 3, 6], "AM")
    assert cb.penalty(model, batch, log=False).item() == pytest.approx(0.2 * (3.0 * r_p + 0.25 * r_c), rel=1e-5)


def test_partial_hierarchy_edge_cases():
    layer = HierarchicalLinear(6, hierarchy=GROUPS)
    # a batch with a single super-class: no center pair -> R_c = 0, no NaN
    out = hierarchical_penalty(layer.geometry(), torch.tensor([0, 1, 1, 2]), "AMcos")
    out["penalty"].backward()
    assert out["between"].item() == 0.0 and out["within"].item() > 0
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    # one class per super-class: no pair inside any group -> R_p = 0
    layer.zero_grad()
    out = hierarchical_penalty(layer.geometry(), torch.tensor([0, 0, 3, 5]), "HMcos'")
    out["penalty"].backward()
    assert out["within"].item() == 0.0 and out["between"].item() > 0
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    # a single class: everything 0, gradient finite
    out = hierarchical_penalty(layer.geometry(), torch.tensor([4, 4]), "bin")
    assert out["penalty"].item() == 0.0


def mean_angles(layer):
    geo = layer.geometry()
    w, g = geo.class_vectors.detach(), torch.tensor(GROUPS)
    within = torch.stack([pairwise_angles(w[g == k]).mean() for k in range(3)]).mean()
    return within.item(), pairwise_angles(geo.center_offsets[0].detach()).mean().item()


@pytest.mark.parametrize("metric", METRICS)
def test_minimizing_r_spreads_classes_and_centers(metric):
    """Direction test: from a random start, minimizing R increases the mean within-group angle (of
    w = s - c) and the mean angle between the super-class centers."""
    torch.manual_seed(1)
    layer = HierarchicalLinear(12, hierarchy=GROUPS)
    within0, between0 = mean_angles(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.3)
    for _ in range(40):
        opt.zero_grad()
        hierarchical_penalty(layer.geometry(), None, metric, weight=1.0)["penalty"].backward()
        opt.step()
    within1, between1 = mean_angles(layer)
    assert within1 > within0 + math.radians(2), (math.degrees(within0), math.degrees(within1))
    assert between1 > between0 + math.radians(2), (math.degrees(between0), math.degrees(between1))


def anchored_layer(a, s, eps=0.5):
    """A 2-level layer (2 groups x 2 classes) with given group vectors a and surfaces s."""
    layer = HierarchicalLinear(2, hierarchy=[0, 0, 1, 1], center="anchored", epsilon=eps).double()
    with torch.no_grad():
        layer.group_vector[0].copy_(torch.tensor(a, dtype=torch.float64))
        layer.surface.copy_(torch.tensor(s, dtype=torch.float64))
    return layer


def test_constraints_zero_when_satisfied_positive_when_violated():
    # centers c = 0.5 a = (5, 0) and (-5, 0); classes at distance 1 from their center; outer radius |a| = 10
    good = anchored_layer([[10.0, 0.0], [-10.0, 0.0]], [[6.0, 0.0], [5.0, 1.0], [-6.0, 0.0], [-5.0, -1.0]])
    out = hierarchical_penalty(good.geometry(), None, "AM", constraints=["C1", "C2", "C3"])
    assert (out["C1"].item(), out["C2"].item(), out["C3"].item()) == (0.0, 0.0, 0.0)
    # outer radius 2 (centers at (1, 0), (-1, 0)), class radius 3: C1 = 3 - 2 = 1, C2 = 1 + 3 - 2 = 2,
    # C3 = 3 + 3 - 2 = 4
    bad = anchored_layer([[2.0, 0.0], [-2.0, 0.0]], [[4.0, 0.0], [1.0, 3.0], [-4.0, 0.0], [-1.0, -3.0]])
    out = hierarchical_penalty(bad.geometry(), None, "AM", weight=0.0, constraints={"C1": 1.0, "C2": 0.5, "C3": 0.25})
    assert out["C1"].item() == pytest.approx(1.0)
    assert out["C2"].item() == pytest.approx(2.0)
    assert out["C3"].item() == pytest.approx(4.0)
    assert out["penalty"].item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 4.0)
    out["penalty"].backward()  # the violations pull the geometry back
    assert bad.group_vector[0].grad.abs().sum() > 0


def test_c3_works_without_group_vectors_and_c1_needs_them():
    layer = HierarchicalLinear(4, hierarchy=GROUPS)
    assert "C3" in hierarchical_penalty(layer.geometry(), None, "AM", constraints=["C3"])
    with pytest.raises(ValueError, match="C1/C2 need each group's outer radius.*center='anchored'"):
        hierarchical_penalty(layer.geometry(), None, "AM", constraints=["C1"])


def test_center_orthogonality():
    layer = HierarchicalLinear(4, hierarchy=GROUPS)
    c = layer.centers().detach()
    out = hierarchical_penalty(layer.geometry(), None, "AM", weight=0.0, center_orthogonality=2.0)
    expected = torch.linalg.norm(c @ c.T - torch.eye(3))
    assert out["orthogonality"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["penalty"].item() == pytest.approx(2 * expected.item(), rel=1e-5)


def test_deeper_tree_adds_a_between_term_per_level():
    top, sub = [[1, 1, 0], [0, 0, 1]], [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    layer = HierarchicalLinear(5, hierarchy=[top, sub], center="anchored")
    geo = layer.geometry()
    out = hierarchical_penalty(geo, None, "AM", constraints=["C1", "C2", "C3"])
    expected = metric_energy(geo.center_offsets[0], "AM") + metric_energy(geo.center_offsets[1], "AM")
    assert out["between"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(bool(torch.isfinite(v)) for v in out.values())


# ----------------------------------------------------------------------------- on a Trainer
class HierNet(PlainNet):
    """PlainNet whose classifier is a HierarchicalLinear."""

    def __init__(self, hand: dict | None = None, **kw):
        super().__init__(classes=8, **kw)
        self.out = HierarchicalLinear(16, hierarchy=GROUPS)
        self.hand = hand

    def extra_loss(self, batch):
        if self.hand is None:
            return torch.zeros(())
        return hierarchical_penalty(self.out.geometry(), batch[1], **self.hand)["penalty"]


def loader():
    return make_loader(n=64, batch_size=16, classes=8)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_same_weights_as_hand_written_penalty(tmp_path, mode):
    kw = dict(metric="AMcos", weight=0.5, constraints=["C3"], center_orthogonality=0.1)
    L.seed_everything(0)
    ref = HierNet(hand=kw)
    trainer(tmp_path).fit(ref, loader())
    L.seed_everything(0)
    model = HierNet()
    t = trainer(tmp_path, callbacks=[HierarchicalRegularizer(mode=mode, **kw)])
    t.fit(model, loader())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    keys = set(t.callback_metrics)
    assert {"dh2l/penalty", "dh2l/within/out", "dh2l/between/out", "dh2l/C3/out", "dh2l/orthogonality/out"} <= keys
    assert "training_step" not in model.__dict__


def test_plain_output_layer_with_given_hierarchy(tmp_path):
    model = PlainNet(classes=8)
    t = trainer(tmp_path, callbacks=[HierarchicalRegularizer(hierarchy=GROUPS, pairs="full")], max_steps=2)
    t.fit(model, loader())
    assert {"dh2l/within/out", "dh2l/between/out"} <= set(t.callback_metrics)
    with pytest.raises(ValueError, match="found no hierarchical layer"):
        trainer(tmp_path, callbacks=[HierarchicalRegularizer()], max_steps=1).fit(PlainNet(classes=8), loader())
    with pytest.raises(ValueError, match="hierarchy covers 6 classes but layer 'out' has 8 rows"):
        trainer(tmp_path, callbacks=[HierarchicalRegularizer(hierarchy=[0, 0, 1, 1, 2, 2])],
                max_steps=1).fit(PlainNet(classes=8), loader())


def test_labels_outside_the_hierarchy():
    model = HierNet()
    cb = HierarchicalRegularizer()
    cb.layers = cb.selection.resolve(model)
    batch = (torch.randn(3, 12), torch.tensor([0, 3, 11]))  # the hierarchy covers classes 0..7
    with pytest.raises(ValueError, match=r"layer 'out'.*labels=<class indices in range \[0, 11\]> is not supported; "
                                         r"accepted values: class indices in \[0, 7\]"):
        cb.penalty(model, batch, log=False)
    with pytest.raises(ValueError, match=r"labels=<tensor of dtype torch.float32> is not supported; "
                                         r"accepted values: an integer tensor"):
        cb.penalty(model, (batch[0], torch.rand(3)), log=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"metric='euclidean' is not supported; accepted values: \[.*'AMcos'"):
        HierarchicalRegularizer(metric="euclidean")
    with pytest.raises(ValueError, match=r"pairs='some' is not supported; accepted values: 'batch', 'full'"):
        HierarchicalRegularizer(pairs="some")
    with pytest.raises(ValueError, match=r"constraints='C4' is not supported; accepted values: 'C1', 'C2', 'C3'"):
        HierarchicalRegularizer(constraints=["C4"])
    with pytest.raises(ValueError, match="weight=-1"):
        HierarchicalRegularizer(weight=-1)
    with pytest.raises(ValueError, match="clamp="):
        HierarchicalRegularizer(clamp=0)
    with pytest.raises(ValueError, match="group"):
        HierarchicalRegularizer(hierarchy=[0, 2])


# ----------------------------------------------------------------------------- 'E' through MHERegularizer
@pytest.mark.parametrize("metric", ["AMcos", "bin", "cosine"])
def test_mhe_regularizer_accepts_dh2l_metrics(tmp_path, metric):
    def run(callbacks):
        L.seed_everything(3)
        model = PlainNet(lr=0.05)
        t = trainer(tmp_path, callbacks=callbacks, max_steps=15)
        t.fit(model, make_loader())
        return model, t

    seen = WeightsAtBatchStart()
    model, t = run([MHERegularizer(metric=metric, hidden_weight=1.0, output_weight=1.0), seen])
    # the logged energy is the metric's energy of the weights the last step started from
    logged = t.callback_metrics["mhe/energy/fc1"].item()
    expected = metric_energy(seen.params["fc1.weight"], metric).item()
    assert logged == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if metric != "bin":  # the binary (sign) metric does not see the last small update
        assert logged != pytest.approx(metric_energy(model.fc1.weight.detach(), metric).item(), rel=1e-4, abs=1e-6)
    base, _ = run([])
    for name in ("fc1", "fc2", "out"):
        reg_e = metric_energy(getattr(model, name).weight.detach(), metric).item()
        base_e = metric_energy(getattr(base, name).weight.detach(), metric).item()
        assert reg_e < base_e, (name, reg_e, base_e)


@pytest.mark.parametrize("metric", [m for m in METRICS if m != "angular"])  # "angular" = A-MHE there
def test_mhe_regularizer_takes_every_dh2l_metric(metric):
    """Every name of the metric family (the paper's baselines N-euclidean2, angular2, cosine included) is accepted
    and gives lambda_h * sum_hidden E + lambda_o * E_out with E = metric_energy."""
    model = PlainNet()
    cb = MHERegularizer(metric=metric, hidden_weight=0.5, output_weight=2.0)
    assert cb.metric == metric
    cb.layers = cb.selection.resolve(model)
    expected = (0.5 * (metric_energy(model.fc1.weight, metric) + metric_energy(model.fc2.weight, metric))
                + 2.0 * metric_energy(model.out.weight, metric))
    assert cb.penalty(model, None, log=False).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mhe_regularizer_dh2l_penalty_and_errors(tmp_path):
    model = PlainNet()
    cb = MHERegularizer(metric="GMcos'", hidden_weight=2.0, output_weight=0.5, output_mode="labels")
    cb.layers = cb.selection.resolve(model)
    batch = next(iter(make_loader()))
    expected = (2.0 * (metric_energy(model.fc1.weight, "GMcos'") + metric_energy(model.fc2.weight, "GMcos'"))
                + 0.5 * metric_energy_from_labels(model.out.weight, batch[1], "GMcos'"))
    assert cb.penalty(model, batch, log=False).item() == pytest.approx(expected.item(), rel=1e-6)
    assert MHERegularizer(metric="AM_prime").metric == "AM'"
    with pytest.raises(ValueError, match=r"metric='manhattan' is not supported; accepted values: 'euclidean', "
                                         r"'angular' or a DH2L metric name .*'HMcos'"):
        MHERegularizer(metric="manhattan")
    with pytest.raises(ValueError, match="half_space=True is not supported; "
                                         "accepted values: False with the DH2L metric 'AM'"):
        MHERegularizer(metric="AM", half_space=True)


def test_e_plus_h_on_conv_layers(tmp_path):
    """'E' with a DH2L metric on conv + FC layers and 'H' on a hierarchical head, together."""

    class ConvNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.head = HierarchicalLinear(8, hierarchy=GROUPS)

        def training_step(self, batch, batch_idx):
            x, y = batch
            f = torch.relu(self.conv(x.view(-1, 1, 4, 3)[:, :, :3, :3].repeat(1, 1, 2, 2))).mean(dim=(2, 3))
            return nn.functional.cross_entropy(self.head(f), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    t = trainer(tmp_path, max_steps=3, callbacks=[MHERegularizer(metric="bin", hidden_weight=1.0),
                                                 HierarchicalRegularizer(metric="bin")])
    t.fit(ConvNet(), loader())
    assert {"mhe/energy/conv", "mhe/energy/head", "dh2l/within/head"} <= set(t.callback_metrics)


# ----------------------------------------------------------------------------- configs
def test_gaussian_config_runs(tmp_path, capsys):
    from lightning_hyper.cli import run_cli

    run_cli(["fit", "--config", str(CONFIGS / "dh2l_gaussian.yaml"), "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.logger=false",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert "val/acc" in out and "dh2l/penalty" in out and "mhe/penalty" in out


def test_digits_config_runs_offline(tmp_path, capsys):
    """configs/dh2l_digits.yaml: real digits with the fixed 3-super-class grouping, E + H, through the CLI."""
    from lightning_hyper.cli import run_cli
    from lightning_hyper.data import HierarchicalDigitsDataModule

    cli = run_cli(["fit", "--config", str(CONFIGS / "dh2l_digits.yaml"), "--trainer.max_epochs=1",
                   "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false"])
    assert isinstance(cli.datamodule, HierarchicalDigitsDataModule)
    assert isinstance(cli.model.head, HierarchicalLinear) and cli.model.head.hierarchy.sizes == (3, 10)
    assert cli.trainer.global_step == 2
    out = capsys.readouterr().out
    assert "val/acc" in out and "dh2l/penalty" in out and "mhe/penalty" in out


def test_cifar100_config_builds(tmp_path):
    """The CIFAR-100 config instantiates (its data are only read in setup, which needs the files)."""
    from lightning_hyper.cli import run_cli

    cli = run_cli(["--config", str(CONFIGS / "dh2l_cifar100.yaml"), "--trainer.logger=false",
                   f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model.head, HierarchicalLinear) and cli.model.head.hierarchy.sizes == (20, 100)
    assert any(isinstance(cb, HierarchicalRegularizer) for cb in cli.trainer.callbacks)
