"""PointNet (T-Nets), dense PointNet++ and PointCloudClassifier with and without OPT."""
import lightning as L
import numpy as np
import pytest
import torch

from lightning_hyper.data.pointclouds import SyntheticShapesDataModule
from lightning_hyper.models.backbones import build_backbone
from lightning_hyper.models.backbones.pointnet import PointNet, PointNet2, ball_query, farthest_point_sample
from lightning_hyper.models.pointcloud import PointCloudClassifier
from lightning_hyper.nn.opt import opt_layers, orthogonality_errors

SMALL = dict(widths=[16, 16, 16, 32, 64], fc_widths=[32, 16], tnet_widths=[16, 32, 64], tnet_fc_widths=[32, 16])


def _trainer(tmp_path, epochs, **kwargs):
    return L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


def test_pointnet_shapes_and_tnet_identity_init():
    net = PointNet(**SMALL).eval()
    x = torch.randn(4, 50, 3)
    assert net(x).shape == (4, 16) and net.out_features == 16
    # T-Nets start as the identity transform, so the regularizer is 0 and the input is untouched
    assert torch.allclose(net.input_tnet(x.transpose(1, 2)), torch.eye(3).expand(4, 3, 3))
    assert net.feature_transform_loss().item() == pytest.approx(0.0, abs=1e-10)
    # with a non-identity transform the loss is ‖I − AAᵀ‖² (batch mean), checked by hand
    A = torch.randn(2, 5, 5)
    net.feature_transform_matrix = A
    ref = np.mean([np.sum((np.eye(5) - a @ a.T) ** 2) for a in A.numpy()])
    assert net.feature_transform_loss().item() == pytest.approx(ref, rel=1e-5)
    # permutation invariance (max-pool) of the vanilla network
    vanilla = PointNet(**SMALL, input_transform=False, feature_transform=False).eval()
    perm = torch.randperm(50)
    assert torch.allclose(vanilla(x), vanilla(x[:, perm]), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        net(torch.randn(4, 3, 50)[:, :2])


def test_farthest_point_sampling_and_ball_query_against_loops():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(2, 40, 3, generator=gen)
    idx = farthest_point_sample(xyz, 8)
    for b in range(2):
        pts = xyz[b].numpy()
        chosen = [0]
        dist = np.full(40, np.inf)
        for _ in range(7):
            dist = np.minimum(dist, ((pts - pts[chosen[-1]]) ** 2).sum(1))
            chosen.append(int(dist.argmax()))
        assert idx[b].tolist() == chosen
    centers = xyz[:, :5]
    nb = ball_query(xyz, centers, radius=0.3, nsample=6)
    for b in range(2):
        for s in range(5):
            d = ((xyz[b] - centers[b, s]) ** 2).sum(1).sqrt().numpy()
            inside = [i for i in range(40) if d[i] <= 0.3][:6]
            expected = inside + [inside[0]] * (6 - len(inside))
            assert nb[b, s].tolist() == expected


def test_pointnet2_forward_and_backbone_registry():
    net = build_backbone("pointnet2", npoints=[16, 4], radii=[0.3, 0.6], nsamples=[8, 8],
                         widths=[[8, 8], [16, 16], [32]], fc_widths=[16, 8])
    assert isinstance(net, PointNet2)
    out = net.train()(torch.randn(3, 64, 3))
    assert out.shape == (3, 8)
    out.sum().backward()
    assert isinstance(build_backbone("pointnet", **SMALL), PointNet)


def test_opt_excludes_tnet_heads_and_keeps_orthogonality(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = SyntheticShapesDataModule(num_points=64, train_per_class=8, val_per_class=2, test_per_class=2, seed=0)
    m = PointCloudClassifier("pointnet", dm.num_classes, backbone_kwargs=SMALL, opt_method="cayley")
    names = set(opt_layers(m))
    assert "backbone.mlp1.0" in names and "backbone.fc.0" in names and "backbone.input_tnet.mlp.0" in names
    assert not any(n.endswith("transform_head") for n in names) and "head" not in names
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(m, dm)
    assert "train/feature_transform_loss" in trainer.callback_metrics
    assert max(orthogonality_errors(m).values()) < 1e-5


@pytest.mark.parametrize("method", [None, "cayley"])
def test_synthetic_shapes_smoke_accuracy(tmp_path, method):
    L.seed_everything(0, verbose=False)
    dm = SyntheticShapesDataModule(num_points=128, train_per_class=32, val_per_class=2, test_per_class=16, seed=0)
    kwargs = dict(widths=[32, 32, 32, 64, 128], fc_widths=[64, 32], input_transform=False, feature_transform=False)
    m = PointCloudClassifier("pointnet", dm.num_classes, backbone_kwargs=kwargs, opt_method=method)
    trainer = _trainer(tmp_path, 30, limit_val_batches=0)
    trainer.fit(m, dm)
    acc = trainer.test(m, dm, verbose=False)[0]["test/acc"]
    # 6 classes (chance 0.17); benchmarks/opt_claims.py reports 3-seed means of both
    assert acc >= (0.7 if method is None else 0.45)
