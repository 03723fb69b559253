"""select_neurons: names, roles, shapes and values of every covered layer type, checked against the raw
weights sliced by hand; skips, ties, freezing, filters, errors and the output layer by forward order."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_hyper.functional.neurons import as_neurons
from lightning_hyper.nn import NeuronGroup, SkippedLayer, explain_selection, select_neurons, selection_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _names(groups):
    return [g.name for g in groups]


def _roles(groups):
    return {g.name: g.role for g in groups}


def _outputs(groups):
    return [g.name for g in groups if g.role == "output"]


# ---------------------------------------------------------------------------- plain layers
def test_mlp_names_roles_shapes_values():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    groups = select_neurons(model)
    assert _names(groups) == ["0", "2"]
    assert _roles(groups) == {"0": "hidden", "2": "output"}
    for g, layer in zip(groups, (model[0], model[2])):
        assert isinstance(g, NeuronGroup)
        assert g.module is layer and g.parameter_name == "weight" and g.groups == 1 and g.part is None
        assert g.shape == (layer.out_features, layer.in_features)
        assert torch.equal(g.neurons(), layer.weight)


def test_cnn_grouped_conv_and_depthwise():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),                # 0: plain
        nn.Conv2d(4, 6, 3, groups=2),      # 1: 2 groups of 3 neurons, d = 2*9
        nn.Conv2d(6, 6, 3, groups=6),      # 2: depthwise: skipped
        nn.Conv2d(6, 12, 1, groups=6),     # 3: 6 groups of 2 neurons, d = 1
        nn.Flatten(), nn.LazyLinear(5),
    )
    groups, skipped = select_neurons(model, return_skipped=True)
    by = {g.name: g for g in groups}
    assert _names(groups) == ["0", "1", "3"]
    assert ("2", "depthwise") in skipped and ("5", "lazy, not materialized") in skipped
    assert by["0"].groups == 1 and by["0"].shape == (4, 27)
    assert by["1"].groups == 2 and by["1"].shape == (2, 3, 18)
    assert by["3"].groups == 6 and by["3"].shape == (6, 2, 1)
    w = model[1].weight
    ref = torch.stack([torch.stack([w[g * 3 + j].flatten() for j in range(3)]) for g in range(2)])
    assert torch.equal(by["1"].neurons(), ref)
    w3 = model[3].weight
    ref3 = torch.stack([torch.stack([w3[g * 2 + j].flatten() for j in range(2)]) for g in range(6)])
    assert torch.equal(by["3"].neurons(), ref3)


def test_conv1d_conv3d():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv3d(3, 4, 2))
    g1, g3 = select_neurons(model)
    assert g1.shape == (3, 6) and g3.shape == (4, 24)
    assert torch.equal(g3.neurons(), model[1].weight.reshape(4, -1))


def test_conv_transpose_grouped_neurons_are_output_channels():
    ct = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (in=4, out/g=3, 3, 3)
    (g,) = select_neurons(nn.Sequential(ct))
    assert g.name == "0" and g.groups == 2 and g.layout == "transposed"
    w = ct.weight
    ref = torch.empty(2, 3, 2 * 9)
    for grp in range(2):
        for j in range(3):  # output channel grp*3 + j reads input channels grp*2 .. grp*2+1
            ref[grp, j] = torch.cat([w[grp * 2 + i, j].flatten() for i in range(2)])
    assert torch.equal(g.neurons(), ref)
    assert torch.equal(g.neurons().reshape(6, -1), as_neurons(ct))  # the library's one layout rule
    plain = nn.ConvTranspose1d(2, 5, 3)
    (gp,) = select_neurons(plain)
    assert gp.name == "" and gp.shape == (5, 6)
    assert torch.equal(gp.neurons(), torch.stack([plain.weight[:, j].flatten() for j in range(5)]))
    depthwise = nn.ConvTranspose2d(4, 4, 3, groups=4)
    assert explain_selection(nn.Sequential(depthwise)) == [SkippedLayer("0", "depthwise")]


def test_bilinear():
    model = nn.Sequential(nn.Bilinear(3, 4, 5))
    (g,) = select_neurons(model)
    assert g.name == "0" and g.shape == (5, 12)
    ref = torch.stack([model[0].weight[o].flatten() for o in range(5)])
    assert torch.equal(g.neurons(), ref)


# ---------------------------------------------------------------------------- attention
class _Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kw)
        self.fc = nn.Linear(8, 3)


def test_multihead_attention_packed():
    model = _Attn()
    groups = select_neurons(model)
    assert _names(groups) == ["attn.in_proj_weight:q", "attn.in_proj_weight:k", "attn.in_proj_weight:v",
                              "attn.out_proj", "fc"]
    raw = model.attn.in_proj_weight
    for i, g in enumerate(groups[:3]):
        assert g.part == "qkv"[i] and g.parameter_name == "in_proj_weight" and g.module is model.attn
        assert torch.equal(g.neurons(), raw[i * 8:(i + 1) * 8])
    assert groups[3].module is model.attn.out_proj
    assert _names(select_neurons(model, exclude="attn")) == ["attn.out_proj", "fc"]
    assert _names(select_neurons(model, exclude="attn*")) == ["fc"]
    assert _names(select_neurons(model, include="*:k")) == ["attn.in_proj_weight:k"]
    assert _names(select_neurons(model, layer_types="MultiheadAttention"))[-1] == "attn.out_proj"


def test_multihead_attention_unpacked():
    model = _Attn(kdim=4, vdim=6)
    assert not model.attn._qkv_same_embed_dim
    groups = select_neurons(model)
    assert _names(groups) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj",
                              "fc"]
    assert [g.shape for g in groups[:3]] == [(8, 8), (8, 4), (8, 6)]
    assert torch.equal(groups[1].neurons(), model.attn.k_proj_weight)
    q, k, v = torch.randn(3, 2, 8), torch.randn(5, 2, 4), torch.randn(5, 2, 6)
    out = select_neurons(model.attn, example_input=(q, k, v))
    assert _outputs(out) == ["out_proj"]  # out_proj runs functionally inside F.multi_head_attention_forward


def test_transformer_encoder_layer_fast_path_off_and_restored():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    layer.train()
    layer.linear1.eval()  # a submodule in a mode of its own: restored as it was
    fast = torch.backends.mha.get_fastpath_enabled()
    groups = select_neurons(layer, example_input=torch.randn(2, 3, 8))
    assert _names(groups) == ["self_attn.in_proj_weight:q", "self_attn.in_proj_weight:k",
                              "self_attn.in_proj_weight:v", "self_attn.out_proj", "linear1", "linear2"]
    assert _outputs(groups) == ["linear2"]
    assert torch.backends.mha.get_fastpath_enabled() == fast
    assert layer.training and layer.linear2.training and not layer.linear1.training


# ---------------------------------------------------------------------------- recurrent
def _gate_names(prefix, pname, gates):
    return [f"{prefix}.{pname}:{g}" for g in gates]


def test_lstm_two_layers_bidirectional():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    model = nn.ModuleDict({"lstm": lstm})
    groups = select_neurons(model)
    expected = []
    for layer in range(2):
        for suffix in ("", "_reverse"):
            for kind in ("ih", "hh"):
                expected += _gate_names("lstm", f"weight_{kind}_l{layer}{suffix}", "ifgo")
    assert _names(groups) == expected
    by = {g.name: g for g in groups}
    H = 4
    for i, gate in enumerate("ifgo"):
        assert torch.equal(by[f"lstm.weight_ih_l1_reverse:{gate}"].neurons(),
                           lstm.weight_ih_l1_reverse[i * H:(i + 1) * H])
    assert by["lstm.weight_ih_l0:g"].shape == (4, 3) and by["lstm.weight_ih_l1:g"].shape == (4, 8)
    assert by["lstm.weight_hh_l0:o"].shape == (4, 4)
    out = select_neurons(lstm, example_input=torch.randn(5, 2, 3))
    assert _outputs(out) == [g.name for g in out if "_l1" in g.name]  # the top layer, both directions


def test_lstm_proj_size():
    lstm = nn.LSTM(3, 4, proj_size=2)
    groups = select_neurons(lstm)
    assert _names(groups) == ([f"weight_ih_l0:{g}" for g in "ifgo"] + [f"weight_hh_l0:{g}" for g in "ifgo"]
                              + ["weight_hr_l0"])  # the root module: names without a leading dot
    by = {g.name: g for g in groups}
    assert by["weight_hh_l0:f"].shape == (4, 2)  # hidden rows, proj_size columns
    assert by["weight_hr_l0"].part is None and torch.equal(by["weight_hr_l0"].neurons(), lstm.weight_hr_l0)


def test_gru_and_rnn():
    model = nn.ModuleDict({"gru": nn.GRU(3, 5), "rnn": nn.RNN(3, 6)})
    groups = select_neurons(model)
    assert _names(groups) == (_gate_names("gru", "weight_ih_l0", "rzn") + _gate_names("gru", "weight_hh_l0", "rzn")
                              + ["rnn.weight_ih_l0", "rnn.weight_hh_l0"])
    by = {g.name: g for g in groups}
    assert torch.equal(by["gru.weight_hh_l0:n"].neurons(), model["gru"].weight_hh_l0[10:15])
    assert torch.equal(by["rnn.weight_ih_l0"].neurons(), model["rnn"].weight_ih_l0)
    assert by["rnn.weight_ih_l0"].part is None


def test_rnn_cells():
    model = nn.ModuleDict({"cell": nn.LSTMCell(3, 2), "gcell": nn.GRUCell(3, 2), "rcell": nn.RNNCell(3, 2)})
    names = _names(select_neurons(model))
    assert names[:8] == _gate_names("cell", "weight_ih", "ifgo") + _gate_names("cell", "weight_hh", "ifgo")
    assert names[8:14] == _gate_names("gcell", "weight_ih", "rzn") + _gate_names("gcell", "weight_hh", "rzn")
    assert names[14:] == ["rcell.weight_ih", "rcell.weight_hh"]


# ---------------------------------------------------------------------------- embeddings, lazy, ties, frozen
class _LM(nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 10, bias=False)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        return self.decoder(torch.relu(self.hidden(self.embedding(tokens))))


def test_embedding_only_with_layer_types():
    model = _LM(tie=False)
    assert _names(select_neurons(model)) == ["hidden", "decoder"]
    groups = select_neurons(model, layer_types=["Embedding"])
    assert _names(groups) == ["embedding"]
    assert torch.equal(groups[0].neurons(), model.embedding.weight)
    bag = nn.Sequential(nn.EmbeddingBag(7, 3))
    assert _names(select_neurons(bag, layer_types="EmbeddingBag")) == ["0"]
    with pytest.raises(ValueError, match=r"include: pattern 'embedding'.*layer_types=\['Embedding'\]"):
        select_neurons(model, include="embedding")


def test_tied_weights_selected_once():
    model = _LM(tie=True)
    assert model.decoder.weight is model.embedding.weight
    assert _names(select_neurons(model)) == ["hidden", "decoder"]  # embeddings are not selected by default
    groups, skipped = select_neurons(model, layer_types=["Embedding", "Linear"], return_skipped=True)
    assert _names(groups) == ["embedding", "hidden"]
    assert skipped == [("decoder", "tie duplicate of embedding")]


def test_same_module_registered_twice_selected_once():
    model = nn.Module()
    model.a = nn.Linear(3, 4)
    model.b = model.a
    model.c = nn.Linear(4, 2)
    groups, skipped = select_neurons(model, return_skipped=True)
    assert _names(groups) == ["a", "c"]
    assert skipped == [("b", "tie duplicate of a")]


def test_frozen_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    groups, skipped = select_neurons(model, return_skipped=True)
    assert _names(groups) == ["1"] and skipped == [("0", "frozen")]
    assert _names(select_neurons(model, trainable_only=False)) == ["0", "1"]


def test_lazy_linear_before_and_after_materialization():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    groups, skipped = select_neurons(model, return_skipped=True)
    assert _names(groups) == ["2"] and skipped == [("0", "lazy, not materialized")]
    model(torch.randn(1, 5))
    groups = select_neurons(model)
    assert _names(groups) == ["0", "2"] and groups[0].shape == (4, 5)
    # example_input runs the forward pass, which materializes lazy layers
    fresh = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    groups = select_neurons(fresh, example_input=torch.randn(1, 3))
    assert _names(groups) == ["0", "2"] and _outputs(groups) == ["2"]


def test_torch_geometric_lazy_linear():
    pyg = pytest.importorskip("torch_geometric.nn")
    lin = pyg.Linear(-1, 3)
    assert explain_selection(nn.Sequential(lin)) == [("0", "lazy, not materialized")]
    lin(torch.randn(2, 5))
    (g,) = select_neurons(nn.Sequential(lin))
    assert g.shape == (3, 5) and torch.equal(g.neurons(), lin.weight)


# ---------------------------------------------------------------------------- output layer
class _Generator(nn.Module):
    """The first Linear (``inp``) is defined last but runs first."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, 6)
        self.inp = nn.Linear(2, 8)

    def forward(self, z):
        return self.out(torch.relu(self.body(torch.relu(self.inp(z)))))


def test_generator_output_layer_by_execution_order():
    model = _Generator()
    assert _outputs(select_neurons(model)) == ["inp"]  # the static rule: last defined (documented pitfall)
    groups = select_neurons(model, example_input=torch.randn(3, 2))
    assert _outputs(groups) == ["out"]
    assert _names(groups) == ["body", "out", "inp"]  # order stays named_modules order


def test_output_layer_overrides():
    model = _Generator()
    z = torch.randn(3, 2)
    assert _outputs(select_neurons(model, output_layer="body", example_input=z)) == ["body"]
    assert _outputs(select_neurons(model, output_layer="none", example_input=z)) == []
    model.output_layer_name = "body"
    assert _outputs(select_neurons(model, example_input=z)) == ["body"]
    assert _outputs(select_neurons(model, output_layer="out")) == ["out"]  # the argument wins
    model.output_layer_name = "none"
    assert _outputs(select_neurons(model)) == []
    with pytest.raises(ValueError, match=r"output_layer='nope'.*'body'"):
        select_neurons(_Generator(), output_layer="nope")
    attn = _Attn()
    assert _outputs(select_neurons(attn, output_layer="attn.in_proj_weight:v")) == ["attn.in_proj_weight:v"]
    assert _outputs(select_neurons(attn, output_layer="attn")) == ["attn.out_proj"]
    # the output layer is found before filtering: excluded, it is simply not in the result
    assert _outputs(select_neurons(model, exclude="out", output_layer="out")) == []


def test_example_input_forms_and_modes_restored():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)
            self.b = nn.Linear(2, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x, y=None):
            return self.a(x) + self.drop(self.b(y))

    model = KW().train()
    x = torch.randn(1, 2)
    assert _outputs(select_neurons(model, example_input=(x, x))) == ["b"]
    assert _outputs(select_neurons(model, example_input={"x": x, "y": x})) == ["b"]
    assert model.training and model.drop.training
    with pytest.raises(RuntimeError, match="example_input: the forward pass of KW failed"):
        select_neurons(model, example_input=torch.randn(1, 5))
    assert model.training


def test_squeezenet_conv_classifier_is_output():
    tv = pytest.importorskip("torchvision")
    model = tv.models.squeezenet1_1(num_classes=10)
    groups = select_neurons(model, example_input=torch.randn(1, 3, 48, 48))
    assert _outputs(groups) == ["classifier.1"]
    assert groups[-1].name == "classifier.1" and groups[-1].shape == (10, 512)
    assert model.training
    assert _outputs(select_neurons(model)) == []  # no Linear: the static rule finds no output layer


def test_mobilenet_v3_depthwise_reported():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v3_small(num_classes=10)
    groups, skipped = select_neurons(model, example_input=torch.randn(1, 3, 32, 32), return_skipped=True)
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.out_channels]
    assert depthwise and [s.name for s in skipped] == depthwise
    assert all(s.reason == "depthwise" for s in skipped)
    assert _outputs(groups) == ["classifier.3"]
    selected = {g.name for g in groups}
    assert not selected & set(depthwise)
    assert selected == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))} - set(depthwise)


@pytest.mark.parametrize("cls, names, outputs", [
    ("GCN", ["convs.0.lin", "convs.1.lin"], ["convs.1.lin"]),
    ("GAT", ["convs.0.lin", "convs.1.lin"], ["convs.1.lin"]),
    ("GraphSAGE", ["convs.0.lin_l", "convs.0.lin_r", "convs.1.lin_l", "convs.1.lin_r"],
     ["convs.1.lin_l", "convs.1.lin_r"]),
    ("GIN", ["convs.0.nn.lins.0", "convs.0.nn.lins.1", "convs.1.nn.lins.0", "convs.1.nn.lins.1"],
     ["convs.1.nn.lins.1"]),
])
def test_torch_geometric_models(cls, names, outputs):
    models = pytest.importorskip("torch_geometric.nn.models")
    model = getattr(models, cls)(4, 8, num_layers=2, out_channels=3)
    x = torch.randn(5, 4)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    groups = select_neurons(model, example_input=(x, edge_index))
    assert _names(groups) == names
    assert _outputs(groups) == outputs
    assert _outputs(select_neurons(model)) == outputs  # static rule, expanded to the conv's parallel branches
    for g in groups:
        assert torch.equal(g.neurons(), g.module.weight)
    assert groups[-1].shape[0] == 3


def test_library_heads_are_selected():
    from lightning_hyper.nn import ArcFaceHead, HierarchicalLinear

    model = nn.ModuleDict({"body": nn.Linear(4, 6), "head": ArcFaceHead(6, 5),
                           "hier": HierarchicalLinear(6, hierarchy=[0, 0, 1, 1])})
    groups = select_neurons(model)
    assert _names(groups) == ["body", "head", "hier"]
    assert _outputs(groups) == ["hier"]
    assert groups[2].shape == (4, 6) and torch.equal(groups[2].neurons(), model["hier"].weight)
    assert {id(p) for p in groups[2].parameters()} == {id(p) for p in model["hier"].parameters()}


# ---------------------------------------------------------------------------- effective weights
def test_neurons_reflect_a_parametrization():
    lin = nn.Linear(3, 5)
    model = nn.Sequential(lin)
    parametrize_orth = torch.nn.utils.parametrizations.orthogonal
    parametrize_orth(lin)
    (g,) = select_neurons(model)
    assert g.name == "0" and g.parameter_name == "weight"
    assert torch.allclose(g.neurons(), lin.weight)
    before = g.neurons().detach().clone()
    assert torch.allclose(before.T @ before, torch.eye(3), atol=1e-5)  # orthonormal columns (5 x 3)
    with torch.no_grad():
        lin.parametrizations.weight.original.add_(0.1 * torch.randn(5, 3))
    after = g.neurons()
    assert not torch.allclose(after, before)
    assert torch.allclose(after, lin.weight)
    assert g.parameters() == [lin.parametrizations.weight.original]


def test_neurons_reflect_opt():
    from lightning_hyper.nn import apply_opt

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    apply_opt(model, method="cayley")  # the output layer "2" stays standard
    groups = select_neurons(model)
    assert _names(groups) == ["0", "2"] and _outputs(groups) == ["2"]
    assert parametrize.is_parametrized(model[0], "weight") and not parametrize.is_parametrized(model[2], "weight")
    assert torch.allclose(groups[0].neurons(), model[0].weight)
    assert groups[0].parameters()[0] is model[0].parametrizations.weight.original
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.5)
    assert torch.allclose(groups[0].neurons(), model[0].weight)  # read at call time


def test_gradient_flows_to_the_parameter():
    model = _Attn()
    groups = select_neurons(model)
    k = groups[1]
    (k.neurons() ** 2).sum().backward()
    grad = model.attn.in_proj_weight.grad
    W = model.attn.in_proj_weight.detach()
    assert torch.allclose(grad[8:16], 2 * W[8:16])
    assert torch.count_nonzero(grad[:8]) == 0 and torch.count_nonzero(grad[16:]) == 0
    conv = nn.Conv2d(4, 6, 3, groups=2)
    (g,) = select_neurons(conv)
    g.neurons().sum().backward()
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))


# ---------------------------------------------------------------------------- filters and errors
def test_include_exclude_globs_and_string_not_iterated():
    model = nn.ModuleDict({"fc1": nn.Linear(2, 3), "fc2": nn.Linear(3, 3), "head": nn.Linear(3, 2)})
    assert _names(select_neurons(model, include="fc1")) == ["fc1"]
    assert _names(select_neurons(model, include=["fc*"])) == ["fc1", "fc2"]
    assert _names(select_neurons(model, include=("fc1", "head"))) == ["fc1", "head"]
    assert _names(select_neurons(model, exclude="fc?")) == ["head"]
    assert _names(select_neurons(model, include="fc*", exclude="fc2")) == ["fc1"]
    _, skipped = select_neurons(model, include="fc1", return_skipped=True)
    assert skipped == [("fc2", "excluded"), ("head", "excluded")]
    assert _names(select_neurons(model, layer_types="Linear")) == ["fc1", "fc2", "head"]
    assert _names(select_neurons(model, layer_types=[nn.Linear])) == ["fc1", "fc2", "head"]


def test_unmatched_patterns_and_types_raise():
    model = nn.ModuleDict({"fc1": nn.Linear(2, 3), "head": nn.Linear(3, 2)})
    with pytest.raises(ValueError, match=r"include: pattern 'conv\*' matches no layer.*'fc1', 'head'"):
        select_neurons(model, include="conv*")
    with pytest.raises(ValueError, match=r"exclude: pattern 'x'"):
        select_neurons(model, exclude=["fc1", "x"])
    with pytest.raises(ValueError, match=r"layer_types: 'Conv2D' matches no layer.*\['Linear'\]"):
        select_neurons(model, layer_types="Conv2D")


@pytest.mark.parametrize("kwargs, match", [
    ({"include": 3}, r"include=3 is not supported.*glob"),
    ({"include": ["fc1", 2]}, r"include=\['fc1', 2\] is not supported"),
    ({"exclude": b"fc1"}, r"exclude=b'fc1' is not supported"),
    ({"layer_types": [nn.Linear, 1.5]}, r"layer_types=.* is not supported.*class name"),
    ({"layer_types": int}, r"layer_types=<class 'int'> is not supported"),
    ({"output_layer": 0}, r"output_layer=0 is not supported"),
    ({"trainable_only": "yes"}, r"trainable_only='yes' is not supported: expected True or False"),
    ({"return_skipped": 1}, r"return_skipped=1 is not supported"),
])
def test_bad_argument_types(kwargs, match):
    model = nn.ModuleDict({"fc1": nn.Linear(2, 3)})
    with pytest.raises(TypeError, match=match):
        select_neurons(model, **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model=Tensor is not supported"):
        select_neurons(torch.randn(3, 3))


class _Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight_table = nn.Parameter(torch.randn(3, 4, 2))
        self.scale = nn.Parameter(torch.randn(3, 3))  # not named weight*: ignored

    def forward(self, x):
        return x


def test_unreadable_weight_warns_once_with_skipped_rows():
    model = nn.ModuleDict({"a": _Weird(), "fc": nn.Linear(2, 2), "b": _Weird(), "norm": nn.LayerNorm(2)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups, skipped = select_neurons(model, return_skipped=True)
    mine = [w for w in caught if "select_neurons" in str(w.message)]
    assert len(mine) == 1 and "'a' (_Weird)" in str(mine[0].message) and "'b' (_Weird)" in str(mine[0].message)
    assert _names(groups) == ["fc"]
    assert skipped == [("a", "unreadable weight type _Weird"), ("b", "unreadable weight type _Weird")]


# ---------------------------------------------------------------------------- reports
def test_selection_table_and_explain():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1, groups=2),
                          nn.Flatten(), nn.Linear(6, 2))
    model[4].weight.requires_grad_(False)
    groups, skipped = select_neurons(model, return_skipped=True)
    assert explain_selection(model) == skipped == [("1", "depthwise"), ("4", "frozen")]
    text = selection_table(groups, skipped)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "role", "N", "d", "groups"]
    assert lines[1].split() == ["0", "hidden", "4", "27", "1"]
    assert lines[2].split() == ["2", "hidden", "3", "2", "2"]
    assert "skipped (2):" in text and "depthwise" in text and "frozen" in text
    _, skipped = select_neurons(model, include="0", trainable_only=False, return_skipped=True)
    text = selection_table([], skipped)
    assert "2 by include/exclude/layer_types: '2', '4'" in text
