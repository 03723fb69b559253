"""SphereOrthogonalityRegularizer: SphereNet's orthonormal / DCNet's orthogonal kernel penalty as a callback."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import SphereOrthogonalityRegularizer
from lightning_hyper.functional import as_neurons
from lightning_hyper.functional.orthogonal import kernel_orthogonality
from lightning_hyper.nn import DecoupledConv2d, SphereConv2d, SphereLinear
from tests.callbacks.helpers import PlainNet, make_loader, trainer


pytestmark = pytest.mark.usefixtures("one_thread")


class SphereNet(L.LightningModule):
    """Two operator convs, a plain 1x1 shortcut, a SphereLinear hidden FC and a plain classifier."""

    OPERATORS = ("conv1", "conv2", "fc")

    def __init__(self, hand: dict | None = None, lr: float = 0.05):
        super().__init__()
        self.conv1 = SphereConv2d(1, 6, 3, padding=1, angle_fn="linear")
        self.conv2 = DecoupledConv2d(6, 8, 3, padding=1, magnitude="tanh")
        self.shortcut = nn.Conv2d(6, 8, 1)
        self.fc = SphereLinear(8, 12)
        self.classifier = nn.Linear(12, 3)
        self.hand, self.lr = hand, lr

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = (F.relu(self.conv2(h)) + self.shortcut(h)).mean((2, 3))
        return self.classifier(self.fc(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.hand is not None:
            w, kw = self.hand["weight"], {k: v for k, v in self.hand.items() if k != "weight"}
            loss = loss + w * sum(kernel_orthogonality(as_neurons(getattr(self, n)), **kw) for n in self.OPERATORS)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("kw", [{"weight": 0.3}, {"weight": 0.2, "form": "orthogonal", "normalize": True}])
def test_same_weights_as_hand_written_penalty(tmp_path, mode, kw):
    L.seed_everything(0)
    ref = SphereNet(hand=kw)
    trainer(tmp_path, max_steps=4).fit(ref, loader())
    L.seed_everything(0)
    model = SphereNet()
    t = trainer(tmp_path, max_steps=4, callbacks=[SphereOrthogonalityRegularizer(mode=mode, **kw)])
    t.fit(model, loader())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    keys = set(t.callback_metrics)
    assert {"sphere_orth/penalty"} | {f"sphere_orth/{k}/{n}" for k in ("orthogonality", "filter_norm")
                                      for n in SphereNet.OPERATORS} <= keys
    assert not any(k.endswith(("/shortcut", "/classifier")) for k in keys)  # plain 1x1 conv and classifier free
    assert "training_step" not in model.__dict__


def test_logged_values_and_layer_scopes():
    model = SphereNet()
    cb = SphereOrthogonalityRegularizer(weight=2.0)
    cb.layers = cb.selection.resolve(model)
    expected = sum(kernel_orthogonality(as_neurons(getattr(model, n))) for n in SphereNet.OPERATORS)
    assert cb.penalty(model, log=False).item() == pytest.approx(2.0 * expected.item(), rel=1e-6)
    every = SphereOrthogonalityRegularizer(weight=1.0, layers="all")
    every.layers = every.selection.resolve(model)
    with_shortcut = expected + kernel_orthogonality(as_neurons(model.shortcut))
    assert every.penalty(model, log=False).item() == pytest.approx(with_shortcut.item(), rel=1e-6)


def test_regularizer_lowers_the_penalty_during_training(tmp_path):
    """T4 of the spec at toy scale: with the regularizer the summed penalty ends far lower than without."""

    def run(callbacks):
        L.seed_everything(1)
        model = SphereNet(lr=0.05)
        trainer(tmp_path, max_steps=20, callbacks=callbacks).fit(model, loader(n=64))
        return sum(kernel_orthogonality(as_neurons(getattr(model, n))).item() for n in SphereNet.OPERATORS)

    free, regularized = run([]), run([SphereOrthogonalityRegularizer(weight=1.0)])
    assert regularized < 0.5 * free, (regularized, free)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"form='frobenius' is not supported; accepted values: 'orthonormal', "
                                         r"'orthogonal'"):
        SphereOrthogonalityRegularizer(form="frobenius")
    with pytest.raises(ValueError, match=r"layers='hidden' is not supported; accepted values: 'operators', 'all'"):
        SphereOrthogonalityRegularizer(layers="hidden")
    with pytest.raises(ValueError, match="weight=-1"):
        SphereOrthogonalityRegularizer(weight=-1)
    with pytest.raises(ValueError, match="found no hidden layer to regularize.*layers='all'"):
        trainer(tmp_path, max_steps=1, callbacks=[SphereOrthogonalityRegularizer()]).fit(PlainNet(), make_loader())
