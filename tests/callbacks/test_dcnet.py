"""DCNet optimization aids: weight projection, weighted gradients, initialization from a plain CNN."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import PretrainedInit, WeightedGradients, WeightProjection
from lightning_hyper.callbacks.dcnet import init_from_cnn, project_weights, standard_layers, warmup_patch_norms
from lightning_hyper.models.backbones import build_backbone
from lightning_hyper.nn import DecoupledConv2d, DecoupledLinear, SphereConv2d

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class DCNet(L.LightningModule):
    """conv1 decoupled, conv2 weighted decoupled, conv3 sphere, a plain shortcut conv and a plain classifier."""

    def __init__(self, lr=0.05, opt="sgd"):
        super().__init__()
        self.conv1 = DecoupledConv2d(1, 4, 3, padding=1, magnitude="tanh", radius_norm_momentum=0.5)
        self.conv2 = DecoupledConv2d(4, 4, 3, padding=1, magnitude="linear", weighted="linear")
        self.conv3 = SphereConv2d(4, 6, 3, padding=1, angle_fn="linear")
        self.plain = nn.Conv2d(4, 6, 1)
        self.fc = DecoupledLinear(6, 8, magnitude="sphere")
        self.classifier = nn.Linear(8, 3)
        self.lr, self.opt = lr, opt

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = (self.conv3(h) + self.plain(h)).mean((2, 3))
        return self.classifier(self.fc(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n=48, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def make_trainer(tmp_path, callbacks, **kw):
    args = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def kernel_norms(m):
    return m.weight.detach().flatten(1).norm(dim=1)


def test_standard_layers_selection():
    names = [n for n, _ in standard_layers(DCNet())]
    assert names == ["conv1", "conv3", "fc"]  # weighted conv2, plain conv and classifier excluded
    assert [n for n, _ in standard_layers(DCNet(), include_sphere=False)] == ["conv1", "fc"]


def test_project_weights_unit_norm_and_output_unchanged():
    torch.manual_seed(0)
    net = DCNet().double().eval()
    with torch.no_grad():
        for m in (net.conv1, net.conv3, net.fc):
            m.weight.mul_(torch.rand(m.weight.shape[0], *([1] * (m.weight.dim() - 1)), dtype=D) * 5 + 0.5)
    x = torch.randn(4, 1, 6, 6, dtype=D)
    net.conv1.train()
    net.conv1(x)  # set the running patch norm mean
    net.conv1.eval()
    before = net(x)
    untouched = {k: v.clone() for k, v in net.state_dict().items()
                 if k.split(".")[0] in ("conv2", "plain", "classifier")}
    assert project_weights(net, scale=2.0) == 3
    for m in (net.conv1, net.conv3, net.fc):
        torch.testing.assert_close(kernel_norms(m), torch.full((m.weight.shape[0],), 2.0, dtype=D))
    for k, v in untouched.items():
        assert torch.equal(net.state_dict()[k], v)
    assert ((net(x) - before).abs().max() / before.abs().max()) < 1e-3


def test_weight_projection_fires_at_multiples_of_n_and_resumes(tmp_path):
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, float(kernel_norms(pl_module.conv1).sub(1).abs().max())))

    torch.manual_seed(0)
    model = DCNet(lr=0.5)
    with torch.no_grad():
        model.conv1.weight.mul_(3.0)
    wp = WeightProjection(every_n_steps=3)
    make_trainer(tmp_path, [wp, Probe()], max_steps=7).fit(model, loader())
    projected = [s for s, dev in seen if dev < 1e-6]
    assert projected == [3, 6] and wp.num_projections == 2 and wp.last_step == 6
    wp2 = WeightProjection(every_n_steps=3)
    wp2.load_state_dict(wp.state_dict())
    assert (wp2.last_step, wp2.num_projections) == (6, 2)


def test_weight_projection_with_gradient_accumulation(tmp_path):
    wp = WeightProjection(every_n_steps=2)
    make_trainer(tmp_path, [wp], max_steps=4, accumulate_grad_batches=2).fit(DCNet(), loader())
    assert wp.num_projections == 2  # at optimizer steps 2 and 4, not at every batch


def test_callbacks_need_standard_layers(tmp_path):
    class Plain(DCNet):
        def __init__(self):
            super().__init__()
            self.conv1 = self.conv3 = self.fc = None

    for cb in (WeightProjection(), WeightedGradients()):
        with pytest.raises(ValueError, match="found no standard"):
            cb.setup(None, Plain(), "fit")
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightProjection(every_n_steps=0)
    with pytest.raises(ValueError, match="scale"):
        WeightProjection(scale=-1.0)


def test_weighted_gradient_is_independent_of_kernel_norm():
    """Eq. 4.18: ||w|| dL/dw is the same for w and 10 w and equals (I - w_hat w_hat^T) dL/dw_hat."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5, dtype=D)
    target = torch.randn(3, 4, 3, 3, dtype=D)
    grads = []
    for scale in (1.0, 10.0):
        layer = DecoupledConv2d(2, 4, 3, magnitude="sphere", angular="cosine", eps=0.0).double()
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(-1, 1, 72, dtype=D).view(4, 2, 3, 3) * scale)
        F.mse_loss(layer(x), target).backward()
        WeightedGradients.apply([layer])
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-12)
    w = torch.linspace(-1, 1, 72, dtype=D).view(4, 2, 3, 3)
    w_hat = (w.flatten(1) / w.flatten(1).norm(dim=1, keepdim=True)).requires_grad_(True)
    out = F.conv2d(x, w_hat.view(4, 2, 3, 3)) / torch.sqrt(
        F.conv2d(x * x, torch.ones(1, 2, 3, 3, dtype=D)))
    (g_hat,) = torch.autograd.grad(F.mse_loss(out, target), w_hat)
    wh = w_hat.detach()
    ref = g_hat - (g_hat * wh).sum(1, keepdim=True) * wh
    torch.testing.assert_close(grads[0].flatten(1), ref, rtol=1e-8, atol=1e-12)


def test_weighted_gradients_callback_scales_grads_before_the_step(tmp_path):
    record = {}

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "scaled" not in record:
                record["scaled"] = pl_module.conv1.weight.grad.clone()
                record["norms"] = kernel_norms(pl_module.conv1)
                record["weighted_untouched"] = pl_module.conv2.weight.grad.clone()

    class Raw(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "raw" not in record:
                record["raw"] = pl_module.conv1.weight.grad.clone()
                record["raw_weighted"] = pl_module.conv2.weight.grad.clone()

    torch.manual_seed(0)
    model = DCNet()
    with torch.no_grad():
        model.conv1.weight.mul_(7.0)
    make_trainer(tmp_path, [Raw(), WeightedGradients(), Probe()], max_steps=1).fit(model, loader())
    torch.testing.assert_close(record["scaled"], record["raw"] * record["norms"].view(-1, 1, 1, 1))
    torch.testing.assert_close(record["weighted_untouched"], record["raw_weighted"])


def test_weighted_gradients_speed_up_sgd_from_large_kernels():
    """Spec T9: with kernels scaled x100, plain SGD barely moves (steps ~ 1/||w||^2 in angle); weighted
    gradients (~ 1/||w||) reduce the loss tens of times more over 50 steps."""
    torch.manual_seed(0)
    x = torch.randn(64, 2, 6, 6)
    y = (x[:, 0, :3].sum((1, 2)) > x[:, 1, 3:].sum((1, 2))).long()

    def run(weighted: bool) -> float:
        torch.manual_seed(1)
        net = nn.Sequential(DecoupledConv2d(2, 8, 3, magnitude="sphere", angular="linear"), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 16, 2))
        with torch.no_grad():
            net[0].weight.mul_(100.0)
        net[3].requires_grad_(False)  # fixed random readout: only the decoupled kernels learn
        # kernel norms ~58: a weighted step of lr 50 turns kernels by ~lr/58 rad, a plain one by ~lr/58^2
        opt = torch.optim.SGD(net[0].parameters(), lr=50.0)
        first = None
        for _ in range(50):
            loss = F.cross_entropy(net(x), y)
            first = float(loss.detach()) if first is None else first
            opt.zero_grad()
            loss.backward()
            if weighted:
                WeightedGradients.apply([net[0]])
            opt.step()
        return first - float(F.cross_entropy(net(x), y).detach())

    gain_weighted, gain_plain = run(True), run(False)
    assert gain_weighted > 10 * gain_plain and gain_weighted > 0.01, (gain_weighted, gain_plain)


def test_init_from_cnn_reproduces_the_cnn_and_reports_extra_keys(tmp_path):
    torch.manual_seed(0)
    kw = dict(widths=(4, 8), blocks_per_stage=1, in_channels=1, input_size=8, fc_features=16)
    cnn = nn.Sequential(build_backbone("spherenet_cnn", operator="conv", **kw), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(cnn.parameters(), lr=0.1)
    x = torch.randn(16, 1, 8, 8, dtype=D)
    for _ in range(3):  # "trained": BN statistics and weights moved
        opt.zero_grad()
        F.cross_entropy(cnn(x), torch.arange(16) % 3).backward()
        opt.step()
    cnn.eval()
    dc = nn.Sequential(build_backbone("spherenet_cnn", operator="decoupled",
                                      operator_kwargs={"magnitude": "linear", "weighted": "linear", "eps": 0.0},
                                      **kw), nn.Linear(16, 3)).double().eval()
    missing = init_from_cnn(dc, cnn)
    assert missing == []  # LinearConv has no radius and no patch-norm buffer
    torch.testing.assert_close(dc(x), cnn(x))
    tanh = nn.Sequential(build_backbone("spherenet_cnn", operator="tanh", **kw), nn.Linear(16, 3)).double()
    path = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), path)
    missing = init_from_cnn(tanh, path)
    assert missing and all(k.rsplit(".", 1)[-1] in ("radius_raw", "patch_norm_mean", "num_batches_tracked")
                           for k in missing)
    torch.testing.assert_close(tanh[0].features[0].weight, cnn[0].features[0].weight)
    torch.save({"state_dict": cnn.state_dict(), "epoch": 3}, tmp_path / "ckpt.ckpt")
    init_from_cnn(tanh, tmp_path / "ckpt.ckpt")
    other = nn.Sequential(build_backbone("spherenet_cnn", operator="tanh", **{**kw, "widths": (4, 4)}),
                          nn.Linear(16, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        init_from_cnn(other, cnn)
    with pytest.raises(ValueError, match="does not match"):
        init_from_cnn(nn.Sequential(tanh[0]), cnn)
    with pytest.raises(TypeError, match="source must be"):
        init_from_cnn(tanh, 3)


def test_warmup_sets_patch_norm_means_only():
    net = nn.Sequential(DecoupledConv2d(1, 3, 3, magnitude="ball"), nn.BatchNorm2d(3))
    bn_before = net[1].running_mean.clone()
    data = [(torch.randn(4, 1, 5, 5) * 3, None) for _ in range(2)]
    assert warmup_patch_norms(net, data) == 2
    assert torch.equal(net[1].running_mean, bn_before) and int(net[1].num_batches_tracked) == 0
    assert int(net[0].num_batches_tracked) == 2 and float(net[0].patch_norm_mean) > 2.0
    assert net.training and net[0].training  # modes restored


def test_pretrained_init_callback(tmp_path):
    torch.manual_seed(0)
    source = DCNet()
    target = DCNet()
    cb = PretrainedInit(source.state_dict(), warmup_batches=2)
    state = []

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            state.append(torch.equal(pl_module.classifier.weight, source.classifier.weight))
            state.append(int(pl_module.conv1.num_batches_tracked))

    make_trainer(tmp_path, [cb, Probe()], max_steps=1).fit(target, loader())
    assert state == [True, 2] and cb.done
    assert PretrainedInit(None, warmup_batches=0).state_dict() == {"done": False}
    with pytest.raises(ValueError, match="warmup_batches"):
        PretrainedInit(source, warmup_batches=-1)
    with pytest.raises(ValueError, match="submodule='nope'"):
        PretrainedInit(source, submodule="nope").setup(None, target, "fit")
