"""Model zoo, callback half (issue "Any model"): the penalty callbacks and EnergyMonitor on models nobody here
wrote, at toy sizes: torchvision (ResNet-18, MobileNetV3-small, SqueezeNet 1.1, a 2-layer VisionTransformer
with its zero-initialized head), Lightning's demo Transformer, torch-geometric GCN / GAT / GraphSAGE / GIN,
an LSTM language model, tied, frozen, lazy and ``torch.compile``d models, and manual optimization with two
optimizers. Each is wrapped in a small LightningModule written here and trained a few steps with
``MHERegularizer()`` + ``EnergyMonitor()`` (and ``CoMHERegularizer()`` where its projections apply), all
with default arguments. Checks: every parameter finite; the expected group names and roles (SqueezeNet's
output is its 1x1 conv ``classifier.1``, attention gives ``...in_proj_weight:q/k/v``, LSTMs their gates);
the skipped rows are exactly the expected ones (nothing silently left out); and the selected groups end
with lower energy than the same run (same seed) without the callback.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any
from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from lightning.pytorch.demos import Transformer as DemoTransformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import CoMHERegularizer, EnergyMonitor, MHERegularizer
from lightning_hyper.functional import hyperspherical_energy

torchvision = pytest.importorskip("torchvision")
pyg_models = pytest.importorskip("torch_geometric.nn.models")

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


# ------------------------------------------------------------------ the users' LightningModules
class Classify(L.LightningModule):
    """``net(x)`` -> logits; cross-entropy; SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class NodeClassify(Classify):
    """A torch-geometric GNN on one graph: ``forward(x, edge_index)``."""

    def forward(self, x, edge_index):
        return self.net(x, edge_index)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.x, batch.edge_index), batch.y)


class Seq2Seq(Classify):
    """Lightning's demo Transformer: ``forward(inputs, target)`` (log-probabilities), NLL loss."""

    def forward(self, inputs, target):
        return self.net(inputs, target)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 30, dim: int = 16, tie: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        return self.decoder(self.lstm(self.embedding(tokens))[0])


class Tied(nn.Module):
    """A module registered under two names (``shared`` and ``again``) used twice, and an embedding tied to
    the classifier (``decoder.weight is embedding.weight``)."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.shared = nn.Linear(dim, dim)
        self.again = self.shared
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        h = self.embedding(tokens).mean(1)
        return self.decoder(torch.tanh(self.again(torch.tanh(self.shared(h)))))


def mlp(in_features: int = 12, classes: int = 5, first: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(first or nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, classes))


class TwoOptimizers(L.LightningModule):
    """Manual optimization: the body and the head have their own optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        body_opt, head_opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        body_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        body_opt.step()
        head_opt.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=0.05, momentum=0.9),
                torch.optim.Adam(self.head.parameters(), lr=0.01))


# ------------------------------------------------------------------ data
def images(size: int = 32, n: int = 16, batch: int = 4, classes: int = 10) -> DataLoader:
    """Batches of 4 of 10 classes: most classes are missing from a batch."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, 3, size, size, generator=g)[y] + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def vectors(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)),
                      batch_size=batch)


def tokens(n: int = 16, batch: int = 4, length: int = 6, vocab: int = 30, shifted: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (n, length + 1), generator=g)
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=batch)


def sentences(n: int = 16, batch: int = 4, length: int = 6, vocab: int = 30) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return DataLoader(TensorDataset(x, x[:, 0] % 5), batch_size=batch)


def graph(nodes: int = 20, features: int = 8, classes: int = 3):
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader as GraphLoader

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (nodes,), generator=g)
    x = torch.randn(classes, features, generator=g)[y] + torch.randn(nodes, features, generator=g)
    edge_index = torch.randint(0, nodes, (2, 60), generator=g)
    return GraphLoader([Data(x=x, edge_index=edge_index, y=y)], batch_size=1)


# ------------------------------------------------------------------ the zoo
@dataclasses.dataclass
class Case:
    build: Callable[[], L.LightningModule]
    data: Callable[[], Any]
    groups: int  # number of selected groups
    outputs: list[str]  # the output groups
    names: list[str]  # some groups that must be selected (hidden unless in outputs)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # every skipped row: name -> reason
    comhe: bool = False
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # given to every callback
    zero_head: bool = False
    steps: int = STEPS


ATT = "encoder.layers.encoder_layer_0.self_attention"
CASES = {
    "resnet18": Case(lambda: Classify(torchvision.models.resnet18(num_classes=10), lr=0.01), images, 21, ["net.fc"],
                     ["net.conv1", "net.layer1.0.conv1", "net.layer4.0.downsample.0"], comhe=True),
    "mobilenet_v3_small": Case(
        lambda: Classify(torchvision.models.mobilenet_v3_small(num_classes=10), lr=0.01), images, 43,
        ["net.classifier.3"], ["net.features.0.0", "net.features.1.block.1.fc1", "net.classifier.0"],
        skipped={f"net.features.{i}.block.{1 if i > 1 else 0}.0": "depthwise" for i in range(1, 12)}, comhe=True),
    "squeezenet1_1": Case(lambda: Classify(torchvision.models.squeezenet1_1(num_classes=10), lr=0.01), images, 26,
                          ["net.classifier.1"], ["net.features.0", "net.features.3.squeeze",
                                                 "net.features.12.expand3x3"], comhe=True),
    "vit": Case(lambda: Classify(torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)),
        lambda: images(size=16), 14, ["net.heads.head"],
        ["net.conv_proj", *(f"net.{ATT}.in_proj_weight:{p}" for p in "qkv"), f"net.{ATT}.out_proj",
         f"net.{ATT.replace('self_attention', 'mlp')}.0"], zero_head=True, steps=20),
    "demo_transformer": Case(
        lambda: Seq2Seq(DemoTransformer(vocab_size=30, ninp=16, nhead=2, nhid=32, nlayers=1), lr=0.1),
        tokens, 17, ["net.decoder"],
        [*(f"net.transformer.decoder.layers.0.multihead_attn.in_proj_weight:{p}" for p in "qkv"),
         "net.transformer.encoder.layers.0.self_attn.out_proj", "net.transformer.encoder.layers.0.linear1"],
        kwargs={"inputs": lambda batch: (batch[0], batch[1])}),
    **{cls.lower(): Case(lambda cls=cls: NodeClassify(getattr(pyg_models, cls)(8, 16, num_layers=2, out_channels=3)),
                         graph, n, outputs, names)
       for cls, n, outputs, names in [
           ("GCN", 2, ["net.convs.1.lin"], ["net.convs.0.lin"]),
           ("GAT", 2, ["net.convs.1.lin"], ["net.convs.0.lin"]),
           ("GraphSAGE", 4, ["net.convs.1.lin_l", "net.convs.1.lin_r"], ["net.convs.0.lin_l", "net.convs.0.lin_r"]),
           ("GIN", 4, ["net.convs.1.nn.lins.1"], ["net.convs.0.nn.lins.0", "net.convs.1.nn.lins.0"])]},
    "lstm_lm": Case(lambda: Classify(LSTMLanguageModel(), lr=0.1), tokens, 17, ["net.decoder"],
                    [f"net.lstm.weight_{k}_l{layer}:{g}" for k in ("ih", "hh") for layer in (0, 1) for g in "ifgo"],
                    ),
    "tied": Case(lambda: Classify(Tied(), lr=0.1), sentences, 2, ["net.decoder"], ["net.shared"],
                 skipped={"net.again": "tie duplicate of net.shared"}),
    "frozen": Case(lambda: Classify(mlp()), vectors, 2, ["net.4"], ["net.2"], skipped={"net.0": "frozen"}),
    "lazy": Case(lambda: Classify(mlp(first=nn.LazyLinear(16))), vectors, 3, ["net.4"], ["net.0", "net.2"]),
    "compiled": Case(lambda: Classify(torch.compile(mlp(), backend="aot_eager")), vectors, 3,
                     ["net._orig_mod.4"], ["net._orig_mod.0", "net._orig_mod.2"]),
    "manual_two_optimizers": Case(TwoOptimizers, vectors, 3, ["head"], ["body.0", "body.2"]),
}


def _freeze(case: str, module: L.LightningModule) -> L.LightningModule:
    if case == "frozen":
        module.net[0].requires_grad_(False)
    return module


def _fit(case: str, callbacks: list, tmp_path) -> L.LightningModule:
    spec = CASES[case]
    L.seed_everything(0, verbose=False)
    module = _freeze(case, spec.build())
    trainer = L.Trainer(max_steps=spec.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|Precision|TF32).*")
        trainer.fit(module, spec.data())
    return module


def _energy(neurons: torch.Tensor, half_space: bool = False) -> float | None:
    """The callbacks' energy of one group (mean over channel groups; rows of zero norm left out)."""
    sets = list(neurons.detach().double()) if neurons.dim() == 3 else [neurons.detach().double()]
    values = []
    for w in sets:
        w = w[torch.linalg.vector_norm(w, dim=1) >= 1e-6]
        if w.shape[0] >= 2:
            values.append(hyperspherical_energy(w, half_space=half_space).item())
    return sum(values) / len(values) if values else None


_PLAIN: dict[str, L.LightningModule] = {}


def _plain(case: str, tmp_path) -> L.LightningModule:
    """The same run without any callback (same seed), once per case."""
    if case not in _PLAIN:
        _PLAIN[case] = _fit(case, [], tmp_path)
    return _PLAIN[case]


def _assert_lower_energy(case: str, model: nn.Module, cb, tmp_path, half_space_hidden: bool) -> None:
    """The selected groups end with lower energy than without the callback: the geometric mean of the
    per-group ratios is below 1 by more than rounding, and at least 80 % of the groups are lower (one group
    can be dominated by the data loss over a few steps, e.g. a zero-initialized head whose missing classes
    keep exactly identical rows, which no energy gradient separates)."""
    from lightning_hyper.nn import select_neurons

    plain = _plain(case, tmp_path)
    ours = {g.name: g for g in select_neurons(model, output_layer="none", trainable_only=False)}
    theirs = {g.name: g for g in select_neurons(plain, output_layer="none", trainable_only=False)}
    ratios = []
    for g in cb.layers:
        half = half_space_hidden and g.role == "hidden"
        a, b = _energy(ours[g.name].neurons(), half), _energy(theirs[g.name].neurons(), half)
        if a is not None and b is not None:
            ratios.append((a / b, g.name))
    geometric = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
    lower = sum(r < 1 for r, _ in ratios)
    assert geometric < 0.9999 and lower >= 0.8 * len(ratios), (geometric, sorted(ratios)[-3:])


def _check_selection(case: str, cb) -> None:
    spec = CASES[case]
    roles = {g.name: g.role for g in cb.layers}
    assert len(cb.layers) == spec.groups, sorted(roles)
    assert [n for n, r in roles.items() if r == "output"] == spec.outputs
    for name in spec.names:
        assert roles.get(name) == ("output" if name in spec.outputs else "hidden"), name
    assert dict(cb.skipped) == spec.skipped  # nothing silently left out


@pytest.mark.parametrize("case", list(CASES))
def test_mhe_and_monitor_on_the_zoo(case, tmp_path):
    spec = CASES[case]
    mhe, monitor = MHERegularizer(**spec.kwargs), EnergyMonitor(every_n_steps=1, **spec.kwargs)
    if spec.zero_head:
        with pytest.warns(UserWarning, match="zero norm"):
            model = _fit(case, [mhe, monitor], tmp_path)
    else:
        model = _fit(case, [mhe, monitor], tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _check_selection(case, mhe)
    assert [(g.name, g.role) for g in monitor.layers] == [(g.name, g.role) for g in mhe.layers]
    assert {row["layer"] for row in monitor.history} >= {g.name for g in mhe.layers if g.role == "hidden"}
    _assert_lower_energy(case, model, mhe, tmp_path, half_space_hidden=False)
    if case == "frozen":
        torch.testing.assert_close(model.net[0].weight, _plain(case, tmp_path).net[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("case", [name for name, spec in CASES.items() if spec.comhe])
def test_comhe_on_the_zoo(case, tmp_path):
    """Where CoMHE's projections apply (neuron dimension > projection_dim = 30): it lowers the half-space
    energy of the hidden groups (its objective) and the output energy."""
    spec = CASES[case]
    comhe = CoMHERegularizer(verbose=False, **spec.kwargs)
    model = _fit(case, [comhe], tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _check_selection(case, comhe)
    _assert_lower_energy(case, model, comhe, tmp_path, half_space_hidden=True)


@pytest.mark.slow
def test_mhe_on_a_compiled_lightning_module(tmp_path):
    """``trainer.fit(torch.compile(module))`` with the default (inductor) backend: Lightning trains the compiled
    forward; the callbacks' first-batch selection pass runs eagerly (no recompilation for its hooks) and
    finds the same groups as on the plain module. Slow: inductor compiles for ~10-20 s on a CPU."""
    L.seed_everything(0, verbose=False)
    module = Classify(mlp())
    mhe = MHERegularizer(verbose=False)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[mhe])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
        trainer.fit(torch.compile(module), vectors())
    assert [(g.name, g.role) for g in mhe.layers] == [("net.0", "hidden"), ("net.2", "hidden"), ("net.4", "output")]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert "mhe/energy/net.4" in trainer.callback_metrics
