"""Every LightningModule trains with its default hyperparameters on the bundled (offline) data, for more
than one seed (issue "First contact": a default that diverges, like the former lr=0.1, is a defect).
Only the data's shape is passed; optimizer, learning rate, weight decay and heads are the defaults."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_hyper.data import (
    DigitsDataModule,
    KarateClubDataModule,
    OpenSetDataModule,
    SyntheticShapesDataModule,
)
from lightning_hyper.models import (
    GraphClassifier,
    HypersphericalClassifier,
    OPTClassifier,
    PointCloudClassifier,
    SphereFaceModule,
)

DIGITS = {"in_channels": 1, "input_size": 8}

# name: (model, data, epochs, metric, threshold); measured on seeds 0 and 1 (2 cores):
# hyper 0.983 / 0.976, opt 0.948 / 0.917, sphereface (10 epochs) 0.96 / 0.93, gcn test 0.73 / 0.60 (chance 0.35),
# pointnet 0.625 / 0.51 (chance 1/6)
CASES = {
    "HypersphericalClassifier": (lambda: HypersphericalClassifier(backbone="cnn6", num_classes=10,
                                                                  backbone_kwargs=DIGITS),
                                 DigitsDataModule, 3, "val/acc", 0.9),
    "OPTClassifier": (lambda: OPTClassifier(backbone="cnn6", num_classes=10, backbone_kwargs=DIGITS),
                      DigitsDataModule, 3, "val/acc", 0.85),
    "SphereFaceModule": (lambda: SphereFaceModule(backbone="embedding_mlp", num_classes=7,
                                                  backbone_kwargs={"in_features": 64, "hidden": [128, 128],
                                                                   "embedding_dim": 16}),
                         lambda: OpenSetDataModule(dataset="digits", heldout_classes=[0, 1, 2], flatten=True),
                         10, "val/acc", 0.85),
    "GraphClassifier": (lambda: GraphClassifier(num_features=34, num_classes=4), KarateClubDataModule, 100,
                        "test/acc", 0.5),
    "PointCloudClassifier": (lambda: PointCloudClassifier(num_classes=6, backbone_kwargs={
        "widths": [16, 16, 16, 32, 64], "fc_widths": [32, 16]}),
        lambda: SyntheticShapesDataModule(num_points=64, train_per_class=32), 20, "val/acc", 0.4),
}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_defaults_train_on_bundled_data(name, seed, tmp_path):
    build, data, epochs, metric, threshold = CASES[name]
    L.seed_everything(seed, verbose=False)
    model, dm = build(), data()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    if metric.startswith("test/"):
        trainer.test(model, dm, verbose=False)
    value = float(trainer.callback_metrics[metric])
    assert value >= threshold, f"{name} seed {seed}: {metric} = {value:.3f} < {threshold}"
    assert all(torch.isfinite(p).all() for p in model.parameters())

