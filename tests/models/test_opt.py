"""OPTClassifier: OPT CNN on sklearn digits (real Trainer runs, tiny widths)."""
import lightning as L
import pytest
import torch

from lightning_hyper.callbacks import EnergyMonitor
from lightning_hyper.data.digits import DigitsDataModule
from lightning_hyper.functional.energy import hyperspherical_energy
from lightning_hyper.models.opt import OPTClassifier
from lightning_hyper.nn.opt import get_opt, opt_layers, orthogonality_errors

TINY = {"in_channels": 1, "input_size": 8, "widths": [8, 8, 8], "fc_features": 16}


def _trainer(tmp_path, **kwargs):
    return L.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=2, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, **{"enable_checkpointing": False, **kwargs})


def test_backbone_layers_converted_head_untouched():
    m = OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method="cayley")
    names = set(opt_layers(m))
    assert len(names) == 7 and "head" not in names  # 6 convs + FC (thesis: 7 OPT layers in CNN-6)
    assert get_opt(m.backbone.features[0]).V.shape == (9, 8)
    assert m.hparams.opt_method == "cayley" and m.hparams.weight_decay == 5e-4
    assert not opt_layers(OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method=None))
    default = OPTClassifier("cnn6", 10, backbone_kwargs={"in_channels": 1, "input_size": 8}, opt_method=None)
    assert default.backbone.out_features == 64  # Table F.1 widths by default


def test_energy_invariance_on_digits(tmp_path):
    L.seed_everything(0, verbose=False)
    m = OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method="gram_schmidt", lr=0.05)
    initial = {n: hyperspherical_energy(get_opt(layer).V.T).item() for n, layer in opt_layers(m).items()}
    monitor = EnergyMonitor(every_n_steps=1, exclude="head")
    trainer = _trainer(tmp_path, callbacks=[monitor])
    trainer.fit(m, DigitsDataModule(batch_size=32))
    assert len(monitor.history) == 8 * 7
    for row in monitor.history:
        assert abs(row["energy"] - initial[row["layer"]]) <= 1e-5 * initial[row["layer"]]
    assert max(orthogonality_errors(m).values()) < 1e-5


def test_ogd_classifier_and_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    m = OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method="ogd", lr=0.05, ogd_lr=0.05)
    trainer = _trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(m, DigitsDataModule(batch_size=32))
    assert max(orthogonality_errors(m).values()) < 1e-5
    P = m.backbone.features[0].parametrizations.weight.original
    assert not torch.allclose(P.detach(), torch.eye(9))
    loaded = OPTClassifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    x = torch.rand(3, 1, 8, 8)
    m.eval()
    loaded.eval()
    assert torch.allclose(loaded(x), m(x), atol=1e-5)


def test_bad_opt_arguments():
    with pytest.raises(ValueError, match="accepted values"):
        OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method="svd")
    with pytest.raises(ValueError, match="opt_method"):
        OPTClassifier("cnn6", 10, backbone_kwargs=TINY, opt_method=None, opt_kwargs={"blocks": 2})
