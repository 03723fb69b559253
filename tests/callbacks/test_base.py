"""The penalty base's injection (DESIGN.md contract 3) for every shape a ``training_step`` may return:
a loss tensor, a dict with ``"loss"``, and ``None`` (Lightning's way to skip a batch), in both modes."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_hyper.callbacks import MHERegularizer
from tests.callbacks.helpers import PlainNet, make_loader, trainer
from tests.callbacks.test_mhe import hand_penalty

HW, OW = 3.0, 0.5


class DictNet(PlainNet):
    """Returns ``{"loss": ..., "acc": ...}``; ``hand=True`` adds the penalty by hand."""

    def __init__(self, hand: bool = False, **kw):
        super().__init__(**kw)
        self.hand = hand

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.hand:
            loss = loss + hand_penalty(self, HW, OW)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean().detach()}


class SkippingNet(PlainNet):
    """Skips every batch whose index is in ``skip`` by returning ``None``."""

    def __init__(self, skip=(1, 2), hand: bool = False, **kw):
        super().__init__(**kw)
        self.skip, self.hand = set(skip), hand

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip:
            return None
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss + hand_penalty(self, HW, OW) if self.hand else loss


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fit(model, tmp_path, callbacks=(), **kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("max_steps", -1)
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, make_loader(n=64, batch_size=16))  # 4 batches
    return t


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_dict_output_gets_the_penalty(tmp_path, mode):
    L.seed_everything(0)
    ref = DictNet(hand=True)
    fit(ref, tmp_path)
    L.seed_everything(0)
    model = DictNet()
    t = fit(model, tmp_path, [MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode)])
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    assert "mhe/penalty" in t.callback_metrics
    L.seed_everything(0)
    plain = DictNet()
    fit(plain, tmp_path)
    assert not torch.allclose(params(plain), params(ref), atol=1e-4)  # the penalty changed training


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_none_output_skips_the_batch_and_its_penalty(tmp_path, mode):
    """Batches 1 and 2 return None: neither the loss nor the penalty moves the weights there, in both
    modes, exactly as when the penalty is written into the loss by hand."""
    L.seed_everything(0)
    ref = SkippingNet(hand=True)
    fit(ref, tmp_path)
    L.seed_everything(0)
    model = SkippingNet()
    seen = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(params(pl_module))

    fit(model, tmp_path, [MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode), Count()])
    assert len(seen) == 4
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # skipped batches change nothing
    assert not torch.equal(seen[2], seen[3])
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_skip_every_batch_in_gradient_mode_changes_nothing(tmp_path):
    L.seed_everything(0)
    model = SkippingNet(skip=range(4))
    before = params(model)
    fit(model, tmp_path, [MHERegularizer(mode="gradient")])
    assert torch.equal(params(model), before)


def test_unsupported_output_is_named(tmp_path):
    class ListNet(PlainNet):
        def training_step(self, batch, batch_idx):
            return [super().training_step(batch, batch_idx)]

    with pytest.raises(Exception, match="training_step must return a loss tensor or a dict with 'loss'"):
        fit(ListNet(), tmp_path, [MHERegularizer(mode="loss")], max_steps=1)
