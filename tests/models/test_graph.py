"""GraphClassifier (GCN on GCNConv) with and without OPT on real Trainer runs."""
import lightning as L
import pytest
import torch

from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer
from lightning_hyper.data.graphs import KarateClubDataModule, SyntheticGraphDataModule
from lightning_hyper.functional.energy import hyperspherical_energy
from lightning_hyper.models.graph import GraphClassifier
from lightning_hyper.nn.opt import get_opt, opt_layers, orthogonality_errors


def _trainer(tmp_path, epochs, **kwargs):
    return L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, **{"enable_checkpointing": False, **kwargs})


def test_opt_applies_to_w0_only_and_uses_pyg_linear():
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    m = GraphClassifier(34, 4, opt_method="cayley")
    assert list(opt_layers(m)) == ["gcn.convs.0.lin"]
    assert isinstance(m.gcn.convs[0].lin, PygLinear)
    assert m.output_layer_name == "gcn.convs.1.lin"
    assert get_opt(m.gcn.convs[0].lin).V.shape == (34, 16)
    with pytest.raises(ValueError, match="opt_method"):
        GraphClassifier(34, 4, opt_kwargs={"r_init": "identity"})
    with pytest.raises(ValueError, match="accepted values"):
        GraphClassifier(34, 4, opt_method="qr")


@pytest.mark.parametrize("method", [None, "cayley"])
def test_karate_club_smoke_accuracy(tmp_path, method):
    L.seed_everything(0, verbose=False)
    dm = KarateClubDataModule(train_per_class=3, seed=0)
    m = GraphClassifier(dm.num_features, dm.num_classes, opt_method=method)
    trainer = _trainer(tmp_path, 200, limit_val_batches=0)
    trainer.fit(m, dm)
    acc = trainer.test(m, dm, verbose=False)[0]["test/acc"]
    assert acc >= 0.6  # 4 classes (chance 0.25); benchmarks/opt_claims.py reports 3-seed means


def test_energy_of_opt_layer_is_invariant_during_training(tmp_path):
    """EnergyMonitor on a real Trainer: the OPT layer's energy stays equal to V's, the plain one moves."""
    histories = {}
    for method in ("cayley", None):
        L.seed_everything(0, verbose=False)
        dm = SyntheticGraphDataModule(num_nodes=60, num_features=12, seed=0)
        m = GraphClassifier(12, 4, opt_method=method, lr=0.05)
        monitor = EnergyMonitor(every_n_steps=1, half_space=True)
        trainer = _trainer(tmp_path, 15, precision="64-true", callbacks=[monitor], limit_val_batches=0)
        trainer.fit(m, dm)
        histories[method] = [h["energy"] for h in monitor.history if h["layer"] == "gcn.convs.0.lin"]
        if method is not None:
            V = get_opt(m.gcn.convs[0].lin).V
            e_v = hyperspherical_energy(V.T, half_space=True).item()
    assert len(histories["cayley"]) == 15
    assert max(abs(e - e_v) for e in histories["cayley"]) < 1e-6 * e_v
    assert max(abs(e - histories[None][0]) for e in histories[None]) > 1e-4 * histories[None][0]


def test_mhe_callback_discovers_gcn_layers(tmp_path):
    L.seed_everything(0, verbose=False)
    mhe = MHERegularizer(hidden_weight=1.0, output_weight=1.0)
    m = GraphClassifier(34, 4, opt_method="cayley")
    trainer = _trainer(tmp_path, 2, callbacks=[mhe], limit_val_batches=0)
    trainer.fit(m, KarateClubDataModule())
    assert {layer.name for layer in mhe.layers} == {"gcn.convs.0.lin", "gcn.convs.1.lin"}
    assert "mhe/penalty" in trainer.callback_metrics


def test_ogd_training_keeps_orthogonality_and_checkpoints(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = SyntheticGraphDataModule(num_nodes=60, num_features=12, seed=0)
    m = GraphClassifier(12, 4, opt_method="ogd", ogd_lr=0.05)
    P = m.gcn.convs[0].lin.parametrizations.weight.original
    trainer = _trainer(tmp_path, 10, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(m, dm)
    assert not torch.allclose(P.detach(), torch.eye(12))  # OGD moved the rotation
    assert orthogonality_errors(m)["gcn.convs.0.lin"] < 1e-5
    opt = trainer.optimizers[0]
    assert all(id(p) != id(P) for g in opt.param_groups for p in g["params"])
    ckpt = trainer.checkpoint_callback.best_model_path
    assert "ogd_optimizer" in torch.load(ckpt, weights_only=False)
    loaded = GraphClassifier.load_from_checkpoint(ckpt)
    data = dm.data
    m.eval()
    loaded.eval()
    assert torch.allclose(loaded(data.x, data.edge_index), m(data.x, data.edge_index), atol=1e-6)


def test_output_scale_options_and_their_learning_rate():
    """opt_scale: scalar / per channel; opt_scale_lr puts the scale(s) in their own param group; opt_v_init."""
    from lightning_hyper.models.graph import DEFAULT_SCALE_LR

    m = GraphClassifier(34, 4, opt_method="cayley")
    assert m.gcn.scales["0"].shape == ()
    opt = m.configure_optimizers()
    opt = opt if isinstance(opt, torch.optim.Optimizer) else opt["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(m.gcn.scales["0"])] == pytest.approx(0.01 * DEFAULT_SCALE_LR)
    assert lr_of[id(m.gcn.convs[1].lin.weight)] == pytest.approx(0.01)
    assert len(lr_of) == len(list(m.parameters()))  # every parameter exactly once
    plain = GraphClassifier(34, 4)
    assert len(plain.gcn.scales) == 0 and len(plain.configure_optimizers().param_groups) == 1

    c = GraphClassifier(34, 4, opt_method="cayley", opt_scale="channel", opt_scale_lr=1.0)
    assert c.gcn.scales["0"].shape == (16,)
    assert len(c.configure_optimizers().param_groups) == 2  # the rotation group (lr 0.3x) and the rest
    assert len(GraphClassifier(34, 4, opt_method="cayley", opt_scale=False).gcn.scales) == 0

    torch.manual_seed(0)
    o = GraphClassifier(34, 4, opt_method="cayley", opt_v_init="orthogonal")
    V = get_opt(o.gcn.convs[0].lin).V
    sv = torch.linalg.svdvals(V)
    assert torch.allclose(sv, sv[0].expand_as(sv), rtol=1e-5)  # orthogonal neurons of equal norm
    assert torch.allclose(o.gcn.convs[0].lin.weight, V.T, atol=1e-6)  # R = I: W = V
    for bad in ({"opt_scale": "layer"}, {"opt_v_init": "qr"}, {"opt_scale_lr": 0}):
        with pytest.raises(ValueError):
            GraphClassifier(34, 4, opt_method="cayley", **bad)
