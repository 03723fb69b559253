"""One training run of the sharded-model tests (tests/callbacks/test_fsdp.py), as a script.

``python -m tests.callbacks.fsdp_worker --strategy fsdp|ddp --out DIR [--variant default|ring] [--steps 4]
[--save-at 2] [--resume CKPT]`` trains a tiny MLP on 2 CPU processes (gloo) with ``MHERegularizer``,
``CoMHERegularizer`` and ``EnergyMonitor``: under ``ModelParallelStrategy`` (``fully_shard`` on every layer in
``configure_model``: each weight is a DTensor, its rows split over the ranks, 15 rows as 8 + 7) or under DDP
with the same seed. Lightning's launcher starts rank 1 by running this module again. Each rank writes
``DIR/rank{r}.pt``: every value the callbacks logged (raw, per rank), the synced ``callback_metrics``, the final
full parameters, the callbacks' state and the printed selection table (rank 0).
"""
from __future__ import annotations

import argparse
import io
import logging
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed import LogRecorder
from lightning_hyper.callbacks import CoMHEProjection, CoMHERegularizer, EnergyMonitor, MHERegularizer

IN, HIDDEN, MID, CLASSES = 12, 16, 15, 5
PREFIXES = ("mhe/", "mhe_labels/", "comhe/", "monitor/", "dh2l/", "orthogonal/", "orthogonality/", "sphere_orth/")


class ShardedNet(L.LightningModule):
    """fc1 (16 x 12), fc2 (15 x 16), out (5 x 15); FSDP2 shards each layer (and the root) over the data-parallel
    mesh when the strategy gives one."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, MID)
        self.out = nn.Linear(MID, CLASSES)
        self.lr = lr

    def configure_model(self) -> None:
        if self.device_mesh is None:  # DDP: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.fc1, self.fc2, self.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (DTensors all-gathered: every rank calls this)."""
    out = {}
    for name, p in module.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


class Recorder(LogRecorder):
    def __init__(self, folder: str) -> None:
        super().__init__(folder, PREFIXES)

    def on_train_end(self, trainer, pl_module):
        states = {c.state_key: c.state_dict() for c in trainer.callbacks
                  if type(c).__module__.startswith("lightning_hyper") and c.state_dict()}
        torch.save({"raw": self.raw, "logged": self.logged, "params": full_state(pl_module), "states": states,
                    "buffers": {n: b.detach().clone() for n, b in pl_module.named_buffers()},
                    "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                    "global_step": trainer.global_step,
                    "weight_types": {n: type(p).__name__ for n, p in pl_module.named_parameters()}},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, IN, generator=g)  # 2 batches per rank and epoch: the checkpoint of step 2 ends an epoch
    y = torch.randint(0, CLASSES, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _strategy(name: str):
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "ddp"


def _shard_every_layer(self) -> None:
    """``configure_model``: ``fully_shard`` every module that owns parameters (children first), then the root."""
    if self.device_mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    mesh = self.device_mesh["data_parallel"]
    for name, module in list(self.named_modules())[::-1]:
        if module is not self and name.count(".") == 0 and any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(self, mesh=mesh)


def sharded_copy(model: L.LightningModule) -> L.LightningModule:
    """``model`` as an instance of a subclass whose ``configure_model`` shards it (FSDP2)."""
    cls = type(model)
    model.__class__ = type(f"Sharded{cls.__name__}", (cls,), {"configure_model": _shard_every_layer})
    return model


def mixed() -> tuple[L.LightningModule, list]:
    """Every other callback family on one model: an S-OPT layer (relaxed, OPT callbacks), a decoupled layer
    (SphereNet/DCNet callbacks) and a DH2L hierarchical head (HierarchicalRegularizer)."""
    from lightning_hyper.callbacks import (HierarchicalRegularizer, OrthogonalityMonitor, OrthogonalRegularizer,
                                           SOPTResampler, SphereOrthogonalityRegularizer, WeightedGradients,
                                           WeightProjection)
    from lightning_hyper.nn import DecoupledLinear
    from lightning_hyper.nn.opt import apply_opt
    from tests.reliability.families import HierNet

    model = HierNet()
    model.fc2 = DecoupledLinear(16, 16, magnitude="tanh", radius_norm=False)
    apply_opt(model, "relaxed", include="fc1", sopt=True, seed=0)  # before sharding
    return model, [HierarchicalRegularizer(weight=1.0, pairs="batch", constraints=["C3"]),
                   SphereOrthogonalityRegularizer(weight=0.05), OrthogonalRegularizer(beta=0.5),
                   SOPTResampler(every_n_steps=2, seed=1), OrthogonalityMonitor(every_n_steps=1),
                   WeightProjection(every_n_steps=2, scale=2.0), WeightedGradients()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=["default", "ring-gradient", "ring-loss", "gather-gradient"],
                        default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--family", default=None, help="a model + callbacks of tests/reliability/families.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = ShardedNet()
    if args.family:
        from tests.reliability.families import loader as family_loader, make

        model, callbacks = mixed() if args.family == "mixed" else make(args.family)
        model = sharded_copy(model)
        callbacks.append(Recorder(args.out))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=_strategy(args.strategy), max_steps=args.steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=args.out, log_every_n_steps=1,
                            callbacks=callbacks)
        trainer.fit(model, family_loader())
        return
    # a penalty of each rank's own labels (SphereFace+ output term): DDP averages its gradient over the ranks
    labels = dict(prefix="mhe_labels", hidden_weight=0.0, output_weight=2.0, output_mode="labels")
    if args.variant != "default":  # e.g. "ring-gradient": every sharded layer's energy on the ring, penalty
        method, mode = args.variant.split("-")  # gradients added to .grad
        mhe = MHERegularizer(sharded_energy=method, mode=mode)
        by_labels = MHERegularizer(**labels, mode=mode)
        monitor = EnergyMonitor(every_n_steps=1, sharded_energy=method)
    else:  # the defaults
        mhe = MHERegularizer()
        by_labels = MHERegularizer(**labels)
        monitor = EnergyMonitor(every_n_steps=1)
    comhe = CoMHERegularizer(projection=CoMHEProjection(projection_dim=8, num_projections=3), seed=5)
    callbacks = [mhe, by_labels, comhe, monitor,
                 Recorder(args.out)]
    if args.save_at:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_train_steps=args.save_at,
                                         save_top_k=-1, save_last=False))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=_strategy(args.strategy), max_steps=args.steps,
                        logger=False,
                        enable_checkpointing=bool(args.save_at), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=args.out, log_every_n_steps=1,
                        callbacks=callbacks)
    printed = io.StringIO()  # what Lightning's logger prints (rank_zero_info: the selection tables)
    handler = logging.StreamHandler(printed)
    logging.getLogger("lightning.pytorch").addHandler(handler)
    trainer.fit(model, loader(), ckpt_path=args.resume)
    with open(os.path.join(args.out, f"printed{trainer.global_rank}.txt"), "w") as f:
        f.write(printed.getvalue())


if __name__ == "__main__":
    main()
