"""SphereFace backbones and SphereFaceModule: architecture, λ driven by global_step (resume), warm
start, divergence report, verification metrics, SphereFace+ through MHERegularizer, the config."""
import math
import os

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.data.openset import OpenSetDataModule
from lightning_hyper.functional.margin import lambda_schedule
from lightning_hyper.models import SphereFaceModule, TrainingDivergedError, build_backbone
from lightning_hyper.models.backbones.sphereface import SPHEREFACE_UNITS, EmbeddingMLP, LSoftmaxCNN, SphereFaceNet


def n_convs(module):
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


# ------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("depth", [4, 10, 20, 36, 64])
def test_sphereface_depths_count_conv_layers(depth):
    net = build_backbone(f"sphere{depth}", in_channels=1, input_size=8, width_mult=0.125, embedding_dim=16)
    assert isinstance(net, SphereFaceNet) and n_convs(net) == depth == 4 + 2 * sum(SPHEREFACE_UNITS[depth])
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    # no BN; every conv followed by PReLU; strided convs have bias, residual convs do not
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.stride == (2, 2) for c in convs) == 4
    assert all((c.bias is not None) == (c.stride == (2, 2)) for c in convs)
    assert sum(isinstance(m, nn.PReLU) for m in net.modules()) == depth


def test_sphereface_full_size_fc_input_and_residual_unit():
    net = SphereFaceNet(depth=4)
    assert net.final_size == (7, 6) and net.fc.in_features == 512 * 7 * 6 and net.out_features == 512
    net20 = SphereFaceNet(depth=20, in_channels=1, input_size=(16, 12), width_mult=0.125)
    unit = net20.features[2]
    x = torch.randn(2, 8, 8, 6)
    torch.testing.assert_close(unit(x), x + unit.act2(unit.conv2(unit.act1(unit.conv1(x)))))
    with pytest.raises(ValueError, match="expects input of shape"):
        net20(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="depth=5"):
        SphereFaceNet(depth=5)
    with pytest.raises(ValueError, match="embedding_activation"):
        SphereFaceNet(depth=4, embedding_activation="tanh")


@pytest.mark.parametrize(
    "variant,convs,final,emb",
    [("mnist_2d", 6, (3, 3), 2), ("mnist", 10, (3, 3), 256), ("cifar10", 13, (4, 4), 256),
     ("cifar100", 13, (4, 4), 512), ("lfw", 17, (7, 6), 512)],
)
def test_lsoftmax_cnn_table_2_1(variant, convs, final, emb):
    net = LSoftmaxCNN(variant, width_mult=0.0625)
    assert n_convs(net) == convs and net.final_size == final and net.out_features == emb
    bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert bn == convs and sum(isinstance(m, nn.PReLU) for m in net.modules()) == convs
    if variant == "lfw":  # forward on a smaller input: 28x24 -> conv0 14x12 -> pools 7x6, 3x3, 1x1
        net = LSoftmaxCNN(variant, width_mult=0.0625, input_size=(28, 24))
        assert net.final_size == (1, 1)
    h, w = net.input_size
    assert net(torch.randn(2, net.in_channels, h, w)).shape == (2, emb)
    assert build_backbone("lsoftmax_cnn", variant="mnist", in_channels=1, input_size=8, width_mult=0.25)(
        torch.randn(3, 1, 8, 8)).shape == (3, 256)


def test_embedding_mlp_has_no_activation_after_embedding():
    mlp = EmbeddingMLP(64, (32, 32), 8)
    assert isinstance(mlp.net[-1], nn.Linear) and mlp(torch.randn(5, 1, 8, 8)).shape == (5, 8)
    with pytest.raises(ValueError, match="64 values per sample"):
        mlp(torch.randn(5, 40))


# ------------------------------------------------------------------------- the module
def tiny_module(**kw):
    args = dict(backbone="embedding_mlp", backbone_kwargs={"in_features": 64, "hidden": [32], "embedding_dim": 8},
                num_classes=7, head="asoftmax", lr=0.05, n_thr=1000)
    args.update(kw)
    return SphereFaceModule(**args)


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, log_every_n_steps=1)
    args.update(kw)
    return L.Trainer(**args)


@pytest.fixture(scope="module")
def digits_dm():
    dm = OpenSetDataModule(dataset="digits", flatten=True, num_pairs=100, batch_size=64)
    dm.setup()
    return dm


class LambdaRecorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen.append((trainer.global_step, pl_module.head.global_step, pl_module.head.lambda_))


def test_fit_logs_lambda_norms_and_open_set_metrics(tmp_path, digits_dm):
    rec = LambdaRecorder()
    model = tiny_module()
    t = trainer(tmp_path, max_steps=4, limit_val_batches=1.0, val_check_interval=4, callbacks=[rec])
    t.fit(model, digits_dm)
    m = t.callback_metrics
    for key in ("train/loss", "train/feature_norm_mean", "train/feature_norm_max", "margin/lambda",
                "val/verification_acc", "val/verification_std", "val/afs", "val/acc", "val/loss"):
        assert key in m and torch.isfinite(m[key]), key
    assert 0.0 <= float(m["val/verification_acc"]) <= 1.0
    # λ used at step t is schedule(t + 1) of the sphereface preset; the head does not self-advance
    assert [s for s, _, _ in rec.seen] == [0, 1, 2, 3]
    for step, head_step, lam in rec.seen:
        assert head_step == step and lam == pytest.approx(lambda_schedule(step + 1))
    assert float(m["margin/lambda"]) == pytest.approx(lambda_schedule(4))
    res = t.test(model, digits_dm, verbose=False)[0]
    assert {"test/verification_acc", "test/afs", "test/acc"} <= set(res)
    # embeddings of predict = backbone output; flip_test doubles the dimension
    x = digits_dm.train_set.tensors[0][:3]
    torch.testing.assert_close(model.predict_step((x,), 0), model.backbone(x))
    flip = tiny_module(flip_test=True, backbone="sphere4",
                       backbone_kwargs={"in_channels": 1, "input_size": 8, "width_mult": 0.125, "embedding_dim": 8})
    xi = x.reshape(3, 1, 8, 8)
    e = flip.embed(xi)
    assert e.shape == (3, 16)
    torch.testing.assert_close(e[:, 8:], flip.backbone(xi.flip(-1)))


def test_lambda_and_feature_norms_reach_the_logger(tmp_path, digits_dm):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="sf")
    trainer(tmp_path, max_steps=4, limit_val_batches=0, log_every_n_steps=2, logger=logger).fit(
        tiny_module(), digits_dm
    )
    rows = [r for r in csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))) if r.get("margin/lambda")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for r in rows:
        assert float(r["margin/lambda"]) == pytest.approx(lambda_schedule(int(r["step"]) + 1), rel=1e-5)
        assert float(r["train/feature_norm_mean"]) > 0 and r["train/acc"] != ""


def test_lambda_schedule_resumes_from_checkpoint(tmp_path, digits_dm):
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = tiny_module(head_kwargs={"lambda_gamma": 1.0, "lambda_min": 0.0})
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt_cb])
    t.fit(model, digits_dm)
    rec = LambdaRecorder()
    model2 = tiny_module(head_kwargs={"lambda_gamma": 1.0, "lambda_min": 0.0})
    t2 = trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[rec])
    t2.fit(model2, digits_dm, ckpt_path=os.path.join(tmp_path, "last.ckpt"))
    assert [s for s, _, _ in rec.seen] == [3, 4, 5]
    for step, _, lam in rec.seen:
        assert lam == pytest.approx(1000.0 / (1 + (step + 1)))  # continues, does not restart at t = 1


def test_warm_start_steps_use_plain_softmax_then_start_the_schedule(tmp_path, digits_dm):
    rec = LambdaRecorder()
    model = tiny_module(warm_start_steps=2)
    trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[rec]).fit(model, digits_dm)
    lams = [lam for _, _, lam in rec.seen]
    assert math.isinf(lams[0]) and math.isinf(lams[1])
    assert lams[2] == pytest.approx(lambda_schedule(1)) and lams[3] == pytest.approx(lambda_schedule(2))
    # with λ = inf the training logits are the plain logits
    x, y = digits_dm.train_set.tensors[0][:5], digits_dm.train_set.tensors[1][:5]
    model.head.lambda_ = math.inf
    feats = model.backbone(x)
    torch.testing.assert_close(model.head(feats, y), model.head(feats))


def test_init_checkpoint_loads_backbone_and_head(tmp_path):
    src = tiny_module(head="linear", head_kwargs={"bias": False})
    path = tmp_path / "softmax.ckpt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = tiny_module(init_checkpoint=str(path))
    assert not torch.equal(dst.backbone.net[1].weight, src.backbone.net[1].weight)
    dst.setup("fit")
    torch.testing.assert_close(dst.backbone.net[1].weight, src.backbone.net[1].weight)
    torch.testing.assert_close(dst.head.weight, src.head.weight)
    other = tiny_module(num_classes=5)
    with pytest.raises(ValueError, match="init_modules=\\['backbone'\\]"):
        other.load_init_checkpoint(str(path))
    assert all(k.startswith("backbone.") for k in other.load_init_checkpoint(str(path), ["backbone"]))
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="has no weights"):
        other.load_init_checkpoint(str(tmp_path / "empty.ckpt"))


class Exploding(nn.Module):
    """A backbone whose features become infinite at a chosen step."""

    out_features = 8

    def __init__(self, at_call=2):
        super().__init__()
        self.lin = nn.Linear(64, 8)
        self.calls, self.at_call = 0, at_call

    def forward(self, x):
        out = self.lin(x.flatten(1))
        self.calls += 1
        return out * float("inf") if self.calls > self.at_call else out


def test_divergence_is_reported_with_step_and_feature_norms(tmp_path, digits_dm):
    model = SphereFaceModule(backbone=Exploding(), num_classes=7, lr=0.01)
    with pytest.raises(TrainingDivergedError, match=r"global_step=2: .*feature norm mean/min/max = inf"):
        trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(model, digits_dm)
    assert model.diverged_at == 2
    model = SphereFaceModule(backbone=Exploding(), num_classes=7, lr=0.01, on_divergence="stop")
    t = trainer(tmp_path, max_steps=50, limit_val_batches=0)
    with pytest.warns(UserWarning, match="diverged"):
        t.fit(model, digits_dm)
    assert model.diverged_at == 2 and t.global_step <= 3
    torch.testing.assert_close(model.backbone.lin.weight, model.backbone.lin.weight.nan_to_num())  # no NaN update
    big = tiny_module(max_feature_norm=1e-3)
    with pytest.raises(TrainingDivergedError, match="max_feature_norm"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(big, digits_dm)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="on_divergence"):
        tiny_module(on_divergence="ignore")
    with pytest.raises(ValueError, match="eval_kinds"):
        tiny_module(eval_kinds=["pairs", "nope"])
    with pytest.raises(ValueError, match="head='nope'"):
        tiny_module(head="nope")
    with pytest.raises(ValueError, match=r"m=.* is not supported; accepted values: an int >= 1"):
        tiny_module(head_kwargs={"m": 0})
    with pytest.raises(ValueError, match="lr_milestones"):
        tiny_module(lr_milestones=[-0.5])


def test_sphereface_plus_output_mhe_from_mhe_regularizer(tmp_path):
    """SphereFace+ (Eq. 5.8) = SphereFaceModule + MHERegularizer(hidden_weight=0, output_mode="labels")."""
    from lightning_hyper.callbacks import MHERegularizer
    from lightning_hyper.functional.energy import output_energy_from_labels

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 7, (32,), generator=g)
    model = tiny_module(lr=1e-9, weight_decay=0.0, lr_milestones=[])
    w0 = model.head.weight.detach().clone()
    mhe = MHERegularizer(hidden_weight=0.0, output_weight=1.0, output_mode="labels")
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[mhe])
    t.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=16))
    assert [(ref.name, ref.role) for ref in mhe.layers if ref.role == "output"] == [("head", "output")]
    expected = output_energy_from_labels(w0, y[:16], s=2.0)
    assert float(t.callback_metrics["mhe/penalty"]) == pytest.approx(float(expected), rel=1e-5)
    # the term really reaches the head's gradient: one SGD step with only the MHE term moves the
    # class neurons apart (lower energy)
    model = tiny_module(lr=0.5, weight_decay=0.0, lr_milestones=[])
    e0 = float(output_energy_from_labels(model.head.weight.detach(), y))
    mhe = MHERegularizer(hidden_weight=0.0, output_weight=100.0, output_mode="labels")
    trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[mhe]).fit(
        model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=32))
    assert float(output_energy_from_labels(model.head.weight.detach(), y)) < e0


def test_config_runs_with_the_cli(tmp_path):
    from lightning_hyper.cli import run_cli

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sphereface_digits.yaml")
    cli = run_cli(["fit", "--config", config, "--trainer.max_steps=3", "--trainer.logger=false",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
                   "--trainer.val_check_interval=3", "--trainer.check_val_every_n_epoch=null",
                   "--trainer.log_every_n_steps=1", "--model.init_args.n_thr=1000"])
    m = cli.trainer.callback_metrics
    assert isinstance(cli.model, SphereFaceModule) and cli.trainer.global_step == 3
    assert "val/verification_acc" in m and "margin/lambda" in m
