"""SphereNet / DCNet backbones, their use from HypersphericalClassifier, and the YAML configs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hyper.cli import run_cli
from lightning_hyper.data import DigitsDataModule
from lightning_hyper.models import HypersphericalClassifier
from lightning_hyper.models.backbones import BACKBONES, build_backbone
from lightning_hyper.models.backbones.spherenet import SphereCNN, SphereResNet
from lightning_hyper.nn import (
    DecoupledConv1d,
    DecoupledConv2d,
    DecoupledLinear,
    GASoftmaxHead,
    SphereConv1d,
    SphereConv2d,
    SphereLinear,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["spherenet_cnn", "spherenet_resnet", "spherenet_resnet18", "dcnet_cnn", "dcnet_resnet", "dcnet_resnet18"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(name):
    if "resnet18" in name:
        return dict(widths=(4, 4, 8, 8))
    if "resnet" in name:
        return dict(widths=(4, 8, 8), units_per_stage=(1, 1, 1))
    return dict(widths=(4, 8, 8), blocks_per_stage=1, fc_features=16)


@pytest.mark.parametrize("name", NAMES)
def test_registered_backbones_build_and_run(name):
    assert name in BACKBONES
    net = build_backbone(name, **_small(name))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, net.out_features) and torch.isfinite(out).all()
    expected = SphereConv2d if name.startswith("spherenet") else DecoupledConv2d
    plain = [m for m in net.modules() if type(m) is nn.Conv2d]
    assert any(type(m) is expected for m in net.modules())
    # only the 1x1 projection shortcuts of the ResNets stay plain convolutions (v2 / reference code)
    assert all(m.kernel_size == (1, 1) for m in plain) and (len(plain) > 0) == ("resnet" in name)


def test_plain_cnn_layout_matches_table_b1():
    net = build_backbone("spherenet_cnn", depth=9)
    convs = [m for m in net.features if isinstance(m, SphereConv2d)]
    assert [c.out_channels for c in convs] == [64] * 3 + [96] * 3 + [128] * 3
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == 3
    assert isinstance(net.fc[1], SphereLinear) and net.fc[1].in_features == 128 * 4 * 4
    assert net.out_features == 256 and isinstance(net.fc[2], nn.BatchNorm1d) and len(net.fc) == 3  # no ReLU
    dc = build_backbone("dcnet_cnn")
    assert [m.out_channels for m in dc.features if isinstance(m, DecoupledConv2d)] == [64] * 3 + [128] * 3 + [256] * 3
    assert isinstance(dc.fc[1], DecoupledLinear) and dc.out_features == 512
    assert dc.features[0].magnitude == "tanh" and dc.features[0].angular == "cosine"


def test_resnet32_layout_and_sphere_shortcut():
    net = build_backbone("spherenet_resnet")
    convs = [m for m in net.modules() if isinstance(m, SphereConv2d)]
    assert len(convs) == 31  # 1 stem + 15 units x 2 (+ FC head outside = 32)
    assert net.out_features == 128
    v1 = build_backbone("spherenet_resnet", widths=(4, 8, 8), units_per_stage=(1, 1, 1), sphere_shortcut=True)
    assert not any(type(m) is nn.Conv2d for m in v1.modules())
    dc = build_backbone("dcnet_resnet", widths=(4, 8, 8), units_per_stage=(2, 1, 1))
    strides = [u.conv1.stride for s in dc.stages for u in s]
    assert strides == [(1, 1), (1, 1), (2, 2), (2, 2)]


def test_operator_choices_and_1d():
    for op, cls in (("conv", nn.Conv2d), ("sphere", SphereConv2d), ("decoupled", DecoupledConv2d),
                    ("BallConv", DecoupledConv2d)):
        net = build_backbone("spherenet_cnn", operator=op, **_small("spherenet_cnn"))
        assert type(net.features[0]) is cls
    assert build_backbone("spherenet_cnn", operator="ball", **_small("cnn")).features[0].magnitude == "ball"
    plain_nobn = build_backbone("spherenet_cnn", operator="conv", use_bn=False, **_small("cnn"))
    assert plain_nobn.features[0].bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain_nobn.modules())
    one_d = build_backbone("spherenet_cnn", dims=1, in_channels=1, input_size=40, **_small("cnn"))
    assert isinstance(one_d.features[0], SphereConv1d) and one_d(torch.randn(3, 1, 40)).shape == (3, 16)
    dc1 = build_backbone("dcnet_cnn", dims=1, in_channels=1, input_size=40, **_small("cnn"))
    assert isinstance(dc1.features[0], DecoupledConv1d)
    shared = build_backbone("spherenet_cnn", operator_kwargs={"angle_fn": "learnable", "k_sharing": "per_network"},
                            **_small("cnn"))
    assert sum("k_raw" in n for n, _ in shared.named_parameters()) == 1
    no_relu = build_backbone("dcnet_cnn", relu=False, operator_kwargs={"angular": "sqcos"}, **_small("cnn"))
    assert not any(isinstance(m, nn.ReLU) for m in no_relu.modules())


def test_backbone_errors():
    with pytest.raises(ValueError, match=r"operator='spherical'.*accepted values.*'conv'"):
        build_backbone("spherenet_cnn", operator="spherical")
    with pytest.raises(ValueError, match=r"angle_fn='tanh'.*accepted values"):
        build_backbone("spherenet_cnn", operator_kwargs={"angle_fn": "tanh"})
    with pytest.raises(ValueError, match=r"magnitude='cube'"):
        build_backbone("dcnet_cnn", operator_kwargs={"magnitude": "cube"})
    with pytest.raises(ValueError, match="depth=10 must be a multiple"):
        build_backbone("spherenet_cnn", depth=10)
    with pytest.raises(ValueError, match="takes no operator kwargs"):
        build_backbone("spherenet_cnn", operator="conv", operator_kwargs={"angle_fn": "linear"})
    with pytest.raises(ValueError, match=r"stem='big'"):
        build_backbone("spherenet_resnet", stem="big")
    net = build_backbone("spherenet_cnn", in_channels=1, input_size=8, **_small("cnn"))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8))


def _digits():
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    return (*dm.train_set.tensors, *dm.val_set.tensors)


@pytest.mark.parametrize("backbone,kwargs,head", [
    ("spherenet_cnn", {"angle_fn": "linear"}, "linear"),
    ("spherenet_cnn", {"angle_fn": "cosine"}, "wsoftmax"),
    ("spherenet_cnn", {"angle_fn": "learnable"}, "linear"),
    ("spherenet_cnn", {"angle_fn": "cosine"}, "gasoftmax"),
    ("dcnet_cnn", {"magnitude": "tanh", "radius_norm_momentum": 0.1}, "linear"),
    ("dcnet_cnn", {"magnitude": "ball", "angular": "linear", "radius_norm_momentum": 0.1}, "linear"),
])
def test_trainability_on_digits(backbone, kwargs, head):
    """Spec T1 (shortened): every operator learns digits in 100 Adam steps, without NaN."""
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    net = build_backbone(backbone, operator_kwargs=kwargs, widths=(16, 32), blocks_per_stage=1, in_channels=1,
                         input_size=8, fc_features=64)
    from lightning_hyper.nn.registry import build_head

    clf = build_head(head, 64, 10)
    params = list(net.parameters()) + list(clf.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _step in range(100):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        feats = net(xtr[idx])
        logits = clf(feats, ytr[idx]) if getattr(clf, "needs_labels", False) else clf(feats)
        loss = F.cross_entropy(logits, ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        acc = float((clf(net(xte)).argmax(1) == yte).float().mean())
    assert acc >= 0.85, acc


def test_classifier_with_ga_softmax_head_trains_in_lightning(tmp_path):
    import lightning as L

    model = HypersphericalClassifier(
        backbone="spherenet_cnn", num_classes=10, head="gasoftmax", head_kwargs={"m": 4, "g": "linear"},
        backbone_kwargs={"operator_kwargs": {"angle_fn": "linear"}, "widths": [8, 16], "blocks_per_stage": 1,
                         "in_channels": 1, "input_size": 8, "fc_features": 32},
        optimizer="adam", lr=1e-3, weight_decay=0.0,
    )
    assert isinstance(model.head, GASoftmaxHead) and model.head_needs_labels
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])


@pytest.fixture
def _clean_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-hyper"])
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("config", ["spherenet_digits.yaml", "dcnet_digits.yaml", "spherenet_mnist1d.yaml"])
def test_offline_configs_run(config, _clean_argv, capsys):
    run_cli(["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run=2", "--trainer.logger=false"])
    out = capsys.readouterr().out
    assert "fit: final metrics:" in out and "sphere_orth/penalty" in out  # the kernel orthogonality regularizer


@pytest.mark.parametrize("config,backbone_cls,op_cls", [("spherenet_cifar10.yaml", SphereCNN, SphereConv2d),
                                                        ("dcnet_cifar10.yaml", SphereResNet, DecoupledConv2d)])
def test_cifar_configs_instantiate(config, backbone_cls, op_cls, _clean_argv):
    cli = run_cli(["--config", str(CONFIGS / config), "--trainer.logger=false"], run=False)
    assert isinstance(cli.model.backbone, backbone_cls)
    assert any(type(m) is op_cls for m in cli.model.backbone.modules())
    assert type(cli.datamodule).__name__ == "CIFAR10DataModule"
    out = cli.model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
