"""The model zoo at realistic sizes: what ``MHERegularizer()`` selects, and what it costs per training step.

For each model (the ones of ``tests/test_model_zoo.py``, at the sizes people train them): the neuron groups
the callback selects on a first batch (count, output group, skipped rows by reason) and the step-time ratio
MHE / plain at a realistic batch size. Plain and MHE steps are measured side by side in one run on the same
model, optimizer and batch, alternating (plain, MHE, plain, ...): the median of ``--steps`` steps of each after
``--warmup`` warm-up steps. A step is zero_grad + forward + loss (+ ``MHERegularizer().penalty``) + backward +
optimizer step, as ``mode="loss"`` does inside Lightning (the Trainer's own overhead is left out).

    python benchmarks/model_zoo.py [--steps 10] [--warmup 3] [--device cpu] [--only resnet18 vit ...]
"""
from __future__ import annotations

import argparse
import collections
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lightning_hyper.callbacks import MHERegularizer


@dataclass
class Bench:
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple]  # (inputs, targets)
    size: str  # the setting, for the table
    call: Callable[[nn.Module, Any], torch.Tensor] = lambda m, x: m(x)  # forward on the inputs
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = \
        lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    optimizers: Callable[[nn.Module], list] = lambda m: [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)]
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m
    inputs: Callable[[tuple], Any] | None = None  # the callback's inputs= getter (default: batch[0])


def _images(b: int, size: int, classes: int = 10):
    return lambda d: (torch.randn(b, 3, size, size, device=d), torch.randint(0, classes, (b,), device=d))


def _tokens(b: int, t: int, vocab: int):
    return lambda d: (torch.randint(0, vocab, (b, t), device=d), torch.randint(0, vocab, (b, t), device=d))


def _graph(nodes: int = 2708, features: int = 1433, classes: int = 7, edges: int = 10556):
    def make(d):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(nodes, features, generator=g).to(d)
        edge_index = torch.randint(0, nodes, (2, edges), generator=g).to(d)
        return (x, edge_index), torch.randint(0, classes, (nodes,), generator=g).to(d)
    return make


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 10000, dim: int = 200, tie: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        return self.decoder(self.lstm(self.embedding(tokens))[0])


class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _mlp(first: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(first or nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def _frozen_backbone(m: nn.Module) -> nn.Module:
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    return m


def _vectors(b: int = 128):
    return lambda d: (torch.randn(b, 784, device=d), torch.randint(0, 10, (b,), device=d))


def cases() -> dict[str, Bench]:
    import torchvision
    import torch_geometric.nn.models as pyg
    from lightning.pytorch.demos import Transformer

    tv = torchvision.models
    gnn = dict(call=lambda m, x: m(*x),
               optimizers=lambda m: [torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=5e-4)])
    return {
        "resnet18": Bench(lambda: tv.resnet18(num_classes=10), _images(64, 32), "32x32, batch 64"),
        "mobilenet_v3_small": Bench(lambda: tv.mobilenet_v3_small(num_classes=10), _images(64, 32), "32x32, batch 64"),
        "squeezenet1_1": Bench(lambda: tv.squeezenet1_1(num_classes=10), _images(64, 32), "32x32, batch 64"),
        "vit": Bench(lambda: tv.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=3,
                                                  hidden_dim=192, mlp_dim=768, num_classes=10),
                     _images(64, 32), "ViT-Tiny 32x32/4, batch 64"),
        "demo_transformer": Bench(lambda: Transformer(), _tokens(20, 35, 33278), "WikiText-2 demo: vocab 33278, 20x35",
                                  call=lambda m, x: m(x, x), loss=lambda out, y: F.nll_loss(out, y.reshape(-1)),
                                  inputs=lambda b: (b[0], b[0])),
        "gcn": Bench(lambda: pyg.GCN(1433, 64, num_layers=2, out_channels=7), _graph(), "Cora size, hidden 64", **gnn),
        "gat": Bench(lambda: pyg.GAT(1433, 64, num_layers=2, out_channels=7, heads=8), _graph(),
                     "Cora size, hidden 64, 8 heads", **gnn),
        "graphsage": Bench(lambda: pyg.GraphSAGE(1433, 64, num_layers=2, out_channels=7), _graph(),
                           "Cora size, hidden 64", **gnn),
        "gin": Bench(lambda: pyg.GIN(1433, 64, num_layers=2, out_channels=7), _graph(), "Cora size, hidden 64", **gnn),
        "lstm_lm": Bench(LSTMLanguageModel, _tokens(20, 35, 10000), "PTB small: vocab 10000, 200, 20x35"),
        "tied": Bench(lambda: LSTMLanguageModel(tie=True), _tokens(20, 35, 10000), "as lstm_lm, decoder = embedding"),
        "frozen": Bench(lambda: tv.resnet18(num_classes=10), _images(64, 32), "resnet18, only fc trainable",
                        prepare=_frozen_backbone,
                        optimizers=lambda m: [torch.optim.SGD([p for p in m.parameters() if p.requires_grad],
                                                              lr=0.01, momentum=0.9)]),
        "lazy": Bench(lambda: _mlp(nn.LazyLinear(512)), _vectors(), "MLP 784-512-256-10, batch 128"),
        "compiled": Bench(lambda: torch.compile(_mlp()), _vectors(), "torch.compile (inductor) MLP, batch 128"),
        "manual_two_optimizers": Bench(TwoParts, _vectors(), "MLP, body SGD + head Adam, batch 128",
                                       optimizers=lambda m: [torch.optim.SGD(m.body.parameters(), lr=0.01),
                                                             torch.optim.Adam(m.head.parameters(), lr=1e-3)]),
    }


def _step(model: nn.Module, bench: Bench, batch: tuple, optimizers: list, mhe: MHERegularizer | None,
          device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = bench.loss(bench.call(model, batch[0]), batch[1])
    if mhe is not None:
        loss = loss + mhe.penalty(model, log=False)
    loss.backward()
    for opt in optimizers:
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(name: str, bench: Bench, steps: int, warmup: int, device: torch.device) -> str:
    torch.manual_seed(0)
    model = bench.prepare(bench.build().to(device))
    batch = bench.batch(device)
    mhe = MHERegularizer(verbose=False, inputs=bench.inputs)
    mhe.resolve(model, batch)  # the groups, as on the first training batch (forward order, lazy layers)
    optimizers = bench.optimizers(model)
    plain_times, mhe_times = [], []
    for i in range(warmup + steps):
        p = _step(model, bench, batch, optimizers, None, device)
        m = _step(model, bench, batch, optimizers, mhe, device)
        if i >= warmup:
            plain_times.append(p)
            mhe_times.append(m)
    plain, reg = statistics.median(plain_times), statistics.median(mhe_times)
    outputs = [g.name for g in mhe.layers if g.role == "output"]
    reasons = collections.Counter(r for _, r in mhe.skipped)
    skipped = ", ".join(f"{n} {r}" for r, n in reasons.items()) or "-"
    largest = max(mhe.layers, key=lambda g: g.shape[-2])
    return (f"{name:<22} {len(mhe.layers):>6}  {', '.join(outputs):<22} {skipped:<13} "
            f"{largest.shape[-2]:>6}  {plain * 1e3:9.1f}  {reg * 1e3:9.1f}  {reg / plain:6.2f}   {bench.size}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=None, help="names of the models to run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    zoo = cases()
    names = args.only or list(zoo)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MHERegularizer() defaults, mode='loss' step; {where}; median of {args.steps} steps after "
          f"{args.warmup} warm-up, plain and MHE alternating on the same model")
    print(f"{'model':<22} {'groups':>6}  {'output':<22} {'skipped':<13} {'max N':>6}  {'plain ms':>9}  "
          f"{'MHE ms':>9}  {'ratio':>6}   setting")
    for name in names:
        print(run(name, zoo[name], args.steps, args.warmup, device), flush=True)


if __name__ == "__main__":
    main()
