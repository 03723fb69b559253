"""HypersphericalClassifier on real (tiny) Trainer runs."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.models import HypersphericalClassifier
from lightning_hyper.nn.registry import HEADS

TINY = {"in_channels": 1, "input_size": 8, "widths": (4, 8, 8), "fc_features": 16}


def tiny_model(**kwargs) -> HypersphericalClassifier:
    kw = dict(backbone="cnn6", backbone_kwargs=TINY, num_classes=5, lr=0.05)
    kw.update(kwargs)
    return HypersphericalClassifier(**kw)


def loaders(n: int = 40, batch_size: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True), DataLoader(ds, batch_size=batch_size), x, y


def trainer(tmp_path, **kwargs) -> L.Trainer:
    kw = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    kw.update(kwargs)
    return L.Trainer(**kw)


def test_head_after_backbone_and_output_layer_name():
    model = tiny_model()
    assert model.output_layer_name == "head"
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert names[-1] == "head"
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 16 and model.head.out_features == 5
    x = torch.randn(3, 1, 8, 8)
    assert model.embed(x).shape == (3, 16)
    torch.testing.assert_close(model(x), model.head(model.embed(x)))


def test_training_step_returns_cross_entropy(tmp_path):
    model = tiny_model()
    model.train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    torch.manual_seed(0)
    loss = model.training_step((x, y), 0)
    # independent: log-softmax by hand on the same logits (BN in train mode uses batch stats)
    logits = model.head(model.backbone(x))
    ref = -(logits - logits.logsumexp(1, keepdim=True)).gather(1, y[:, None]).mean()
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss, ref)


def test_fit_logs_metrics_and_val_acc_is_plain_accuracy(tmp_path):
    train_dl, val_dl, x, y = loaders()
    model = tiny_model()
    t = trainer(tmp_path, max_epochs=2)
    t.fit(model, train_dl, val_dl)
    m = t.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in m, key
    model.eval()
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(1) == y).double().mean().item()  # micro accuracy, not macro
    assert m["val/acc"].item() == pytest.approx(acc, abs=1e-6)
    assert m["val/loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    t.test(model, val_dl, verbose=False)
    assert t.callback_metrics["test/acc"].item() == pytest.approx(acc, abs=1e-6)


def test_training_reduces_loss(tmp_path):
    train_dl, val_dl, x, y = loaders(n=32)
    model = tiny_model(optimizer="adam", lr=1e-2, weight_decay=0.0)
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    model.train()
    trainer(tmp_path, max_epochs=15).fit(model, train_dl)
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.5 * before


def test_checkpoint_round_trip(tmp_path):
    train_dl, _, x, _ = loaders()
    model = tiny_model(optimizer="adamw", lr=1e-3, head_kwargs={"bias": False})
    t = trainer(tmp_path, limit_train_batches=2)
    t.fit(model, train_dl)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = HypersphericalClassifier.load_from_checkpoint(path)
    assert loaded.hparams.backbone == "cnn6" and loaded.hparams.optimizer == "adamw"
    assert loaded.head.bias is None
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_module_backbone_is_not_saved(tmp_path):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 12))
    backbone.out_features = 12
    model = HypersphericalClassifier(backbone=backbone, num_classes=5)
    assert "backbone" not in model.hparams
    train_dl, _, x, _ = loaders()
    t = trainer(tmp_path, limit_train_batches=1)
    t.fit(model, train_dl)
    t.save_checkpoint(tmp_path / "m.ckpt")
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 12))
    fresh.out_features = 12
    loaded = HypersphericalClassifier.load_from_checkpoint(tmp_path / "m.ckpt", backbone=fresh)
    torch.testing.assert_close(loaded(x), model(x))


def _lrs(model, epochs):
    out = model.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_and_multistep_schedules():
    lrs = _lrs(tiny_model(lr=0.1, scheduler="step", step_size=2, gamma=0.5), 6)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    lrs = _lrs(tiny_model(lr=0.1, scheduler="multistep", milestones=[1, 3], gamma=0.1), 5)
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])
    lrs = _lrs(tiny_model(lr=0.2, scheduler="cosine", max_epochs_for_cosine=4), 5)
    assert lrs == pytest.approx([0.2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)], abs=1e-9)


def test_cosine_uses_trainer_max_epochs(tmp_path):
    train_dl, _, _, _ = loaders(n=8)
    model = tiny_model(lr=0.1, scheduler="cosine")
    t = trainer(tmp_path, max_epochs=3)
    t.fit(model, train_dl)
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.T_max == 3
    # after 3 epoch-steps of a T_max=3 cosine the lr has reached 0
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_optimizers():
    opt = tiny_model(optimizer="sgd", lr=0.3, momentum=0.8, weight_decay=5e-4, nesterov=True).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 5e-4
    assert type(tiny_model(optimizer="adam").configure_optimizers()) is torch.optim.Adam
    assert type(tiny_model(optimizer="adamw").configure_optimizers()) is torch.optim.AdamW


class RecordingHead(nn.Linear):
    needs_labels = True

    def __init__(self, in_features, num_classes, margin=0.0):
        super().__init__(in_features, num_classes, bias=False)
        self.margin = margin
        self.calls: list[tuple[bool, bool]] = []  # (labels given, gradient recorded)

    def forward(self, features, labels=None):
        self.calls.append((labels is not None, torch.is_grad_enabled() and features.requires_grad))
        logits = super().forward(features)
        if labels is not None:
            logits = logits - self.margin * F.one_hot(labels, logits.shape[1])
        return logits


def test_label_head_called_with_labels_only_in_training(tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "_recording", RecordingHead)
    train_dl, val_dl, _, _ = loaders(n=16)
    model = tiny_model(head="_recording", head_kwargs={"margin": 1.0})
    assert model.head_needs_labels
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    t.fit(model, train_dl, val_dl)
    # each training step: the loss from the margin logits (labels, with grad), the accuracy from the plain logits
    # (no labels, no grad); validation: plain logits
    assert model.head.calls == [(True, True), (False, False), (True, True), (False, False), (False, False)]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"optimizer='rmsprop'.*accepted values.*sgd"):
        tiny_model(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"scheduler='poly'.*accepted values"):
        tiny_model(scheduler="poly")
    with pytest.raises(ValueError, match="milestones"):
        tiny_model(scheduler="multistep")
    with pytest.raises(ValueError, match="head='nope'"):
        tiny_model(head="nope")
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model(num_classes=1)
    with pytest.raises(TypeError, match="out_features"):
        HypersphericalClassifier(backbone=nn.Flatten())
    with pytest.raises(TypeError, match="backbone"):
        HypersphericalClassifier(backbone=3)
    with pytest.raises(ValueError, match="backbone_kwargs"):
        m = nn.Linear(2, 2)
        m.out_features = 2
        HypersphericalClassifier(backbone=m, backbone_kwargs={"a": 1})
    with pytest.raises(TypeError, match="batch"):
        tiny_model().training_step(torch.randn(2, 1, 8, 8), 0)


def test_cosine_without_max_epochs_errors(tmp_path):
    model = tiny_model(scheduler="cosine")
    with pytest.raises(ValueError, match="max_epochs_for_cosine"):
        model.configure_optimizers()


def test_train_accuracy_of_a_margin_head_uses_plain_logits(tmp_path):
    """A margin head lowers the target logit in training on purpose; train/acc measures the model, so it is
    the accuracy of the plain logits (GA-Softmax with m=4 used to report ~3 % on a model at 93 %)."""
    torch.manual_seed(0)
    model = tiny_model(head="gasoftmax", head_kwargs={"m": 4})
    _, _, x, y = loaders()
    model.training_step((x, y), 0)
    with torch.no_grad():
        plain = (model.head(model.backbone(x)).argmax(1) == y).float().mean()
        margin = (model.head(model.backbone(x), y).argmax(1) == y).float().mean()
    assert model.train_acc.compute() == pytest.approx(float(plain))
    assert float(plain) != pytest.approx(float(margin))  # the two differ here, so the check has teeth


class _LambdaSeen(L.Callback):
    def __init__(self):
        self.seen = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen.append((trainer.global_step, pl_module.head.global_step, pl_module.head.lambda_))


@pytest.mark.parametrize("module", ["classifier", "sphereface"])
def test_margin_head_lambda_follows_optimizer_steps_under_gradient_accumulation(tmp_path, module):
    """Both modules that hold a margin head sync its λ step the same way (MarginHead.sync_step from
    trainer.global_step): with accumulate_grad_batches=2 both micro-batches of a step share λ(step)."""
    from lightning_hyper.models import SphereFaceModule

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)),
                      batch_size=6)
    kw = dict(backbone="embedding_mlp", num_classes=3,
              backbone_kwargs={"in_features": 6, "hidden": [8], "embedding_dim": 4},
              head="gasoftmax", head_kwargs={"m": 4, "lambda_schedule": "sphereface"})
    model = HypersphericalClassifier(optimizer="adam", lr=1e-2, **kw) if module == "classifier" \
        else SphereFaceModule(lr=1e-2, n_thr=100, **kw)
    rec = _LambdaSeen()
    L.Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
              limit_val_batches=0, callbacks=[rec]).fit(model, data)
    assert [s for s, _, _ in rec.seen] == [0, 0, 1, 1, 2, 2]
    for step, head_step, lam in rec.seen:
        assert head_step == step and lam == pytest.approx(model.head.lambda_at(step))
    assert model.head.global_step == 3  # after fit: the number of optimizer steps done


def test_margin_head_loads_the_old_extra_state_step():
    from lightning_hyper.nn import ASoftmaxHead

    head = ASoftmaxHead(4, 3)
    state = {k: v for k, v in head.state_dict().items() if k != "lambda_step"}
    state["_extra_state"] = {"global_step": 41}  # how AngularMarginHead saved its step before the shared base
    head.load_state_dict(state)
    assert head.global_step == 41 and head.lambda_ == pytest.approx(head.lambda_at(41))
