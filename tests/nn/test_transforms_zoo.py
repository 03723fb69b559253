"""Model zoo, transform half: ``apply_opt`` and ``convert`` on models nobody here wrote (tiny sizes).

For each model: the transformed layers are the ones named by ``select_neurons`` (core names, output layer
left plain), predictions are kept where the transform promises it (OPT with ``R = I``; ``convert`` to
DCNet's linear magnitude with ``weighted="linear"``, ``eps=0``, which is the original network), parameter
ties, ``requires_grad`` and module reuse are kept, and parameter counts are what the transform adds.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from lightning_hyper.functional.operators import sphere_linear
from lightning_hyper.nn import DecoupledConv2d, DecoupledLinear, SphereLinear, convert, make_shared_k, select_neurons
from lightning_hyper.nn.convert import plan_convert
from lightning_hyper.nn.opt import OPTSizeWarning, apply_opt, get_opt, opt_layers, plan_opt

pytestmark = pytest.mark.usefixtures("one_thread")

#: DCNet's linear magnitude, linearly weighted, eps = 0: the converted network is the original one
IDENTITY_DC = {"magnitude": "linear", "weighted": "linear", "eps": 0.0}
OUTPUT = "output layer (left plain; output_layer='none' transforms it too)"


# ---------------------------------------------------------------------------------------------- helpers
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval mode with BatchNorm statistics of ``x`` (random-init BN running stats make outputs ~1e-10)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _predict(model: nn.Module, *args) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def _assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to rounding (float32: 1e-5, float64: 1e-10 of the output scale); a changed weight, a lost
    stride or a bypassed layer moves the outputs by far more. DCNet's identity conversion computes
    ``|w| |x| cos`` instead of ``w . x``, so it is compared in float64 (deep float32 nets amplify rounding)."""
    assert ref.abs().max() > 1e-2, "the reference output is too small to compare"
    tol = 1e-5 if ref.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, rtol=0, atol=tol * max(1.0, ref.abs().max().item()))


def _weight_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    modules = dict(model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


def _expected_opt_count(before: int, shapes: dict[str, tuple[int, ...]], p_numel) -> int:
    """Parameters after OPT: each converted weight (n × d) is replaced by its P (``p_numel(d)``)."""
    return before + sum(p_numel(math.prod(s[1:])) - math.prod(s) for s in shapes.values())


def _conv_names(model: nn.Module, *, kernel_gt_1: bool = False, depthwise: bool = False) -> list[str]:
    out = []
    for n, m in model.named_modules():
        if type(m) is nn.Conv2d:
            if kernel_gt_1 and all(k == 1 for k in m.kernel_size):
                continue
            if not depthwise and m.groups > 1 and m.groups == m.out_channels:
                continue
            out.append(n)
    return out


# ---------------------------------------------------------------------------------------------- torchvision
@pytest.mark.slow
def test_resnet18_opt_size_warning_sopt_blocks_and_dcnet_convert():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _calibrated(torchvision.models.resnet18(num_classes=10), x)
    ref = _predict(model, x)
    convs = _conv_names(model)
    assert len(convs) == 20
    before = _n_params(model)
    shapes = _weight_shapes(model, convs)

    # full OPT: one OPTSizeWarning (naming the multiplier and blocks= / sopt=) before anything is built
    multiplier = _expected_opt_count(before, shapes, lambda d: d * d) / before
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPTSizeWarning)
        with pytest.raises(OPTSizeWarning) as info:
            apply_opt(model, "cayley")
    msg = str(info.value)
    assert f"{multiplier:.1f}x the model's parameters" in msg and "blocks=" in msg and "sopt=True" in msg
    assert "'layer4.0.conv2': a 4608x4608 rotation, 9.0x its layer's parameters" in msg
    assert not opt_layers(model) and _n_params(model) == before  # warned before any change

    # S-OPT: (d/4)^2 per layer, no warning, R' = I at the start: identical predictions, fc stays plain
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPTSizeWarning)
        apply_opt(model, "cayley", sopt=True, example_input=x, seed=0)
    assert list(opt_layers(model)) == convs
    assert type(model.fc) is nn.Linear
    assert _n_params(model) == _expected_opt_count(before, shapes, lambda d: round(d / 4) ** 2)
    _assert_same(_predict(model, x), ref)

    # PE-OPT: blocks must divide every d (conv1 has d = 3*7*7 = 147): the error names the layer and blocks
    model = _calibrated(torchvision.models.resnet18(num_classes=10), x)
    ref = _predict(model, x)
    with pytest.raises(ValueError, match=r"'conv1'.*blocks=16 does not divide the neuron dimension d=147"):
        apply_opt(model, "cayley", blocks=16)
    assert not opt_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPTSizeWarning)
        apply_opt(model, "cayley", blocks=16, exclude="conv1", r_init="identity")
    assert list(opt_layers(model)) == convs[1:]
    shapes.pop("conv1")
    assert _n_params(model) == _expected_opt_count(before, shapes, lambda d: d * d // 16)
    _assert_same(_predict(model, x), ref)

    # convert: every 3x3/7x7 conv, not the 1x1 shortcuts nor fc; the weight Parameters are the old ones
    x = x.double()
    model = _calibrated(torchvision.models.resnet18(num_classes=10).double(), x)
    ref = _predict(model, x)
    weight = model.layer1[0].conv1.weight
    assert plan_convert(model, "decoupled").names == _conv_names(model, kernel_gt_1=True)
    convert(model, "decoupled", **IDENTITY_DC)
    assert type(model.layer1[0].conv1) is DecoupledConv2d and model.layer1[0].conv1.weight is weight
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d and type(model.fc) is nn.Linear
    _assert_same(_predict(model, x), ref)


def test_mobilenet_v3_small_depthwise_skipped_and_predictions_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _calibrated(torchvision.models.mobilenet_v3_small(num_classes=10), x)
    ref = _predict(model, x)
    plan = plan_opt(model, example_input=x)
    expected = _conv_names(model) + ["classifier.0"]  # depthwise convs and the output classifier.3 excluded
    assert plan.names == expected
    depthwise = [n for n in _conv_names(model, depthwise=True) if n not in expected]
    assert len(depthwise) == 11 and {s.name for s in plan.skipped if s.reason == "depthwise"} == set(depthwise)
    assert ("classifier.3", OUTPUT) in plan.skipped
    before, shapes = _n_params(model), _weight_shapes(model, expected)
    apply_opt(model, "cayley", example_input=x, r_init="identity")
    assert list(opt_layers(model)) == expected
    assert _n_params(model) == _expected_opt_count(before, shapes, lambda d: d * d)
    _assert_same(_predict(model, x), ref)

    x = x.double()
    model = _calibrated(torchvision.models.mobilenet_v3_small(num_classes=10).double(), x)
    ref = _predict(model, x)
    convert(model, "decoupled", example_input=x, **IDENTITY_DC)
    replaced = [n for n, m in model.named_modules() if isinstance(m, (DecoupledConv2d, DecoupledLinear))]
    assert replaced == ["features.0.0", "classifier.0"]  # the only non-1x1, non-depthwise layers
    _assert_same(_predict(model, x), ref)


def test_squeezenet_conv_classifier_found_by_forward_order():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = _calibrated(torchvision.models.squeezenet1_1(num_classes=10), x)
    ref = _predict(model, x)
    convs = _conv_names(model)
    # without example_input the 1x1-conv classifier cannot be told apart: warned, and it would be converted
    with pytest.warns(UserWarning, match="no output layer found.*example_input"):
        blind = plan_opt(model)
    assert blind.names == convs
    plan = plan_opt(model, example_input=x)
    assert plan.names == convs[:-1] and convs[-1] == "classifier.1" and ("classifier.1", OUTPUT) in plan.skipped
    apply_opt(model, "cayley", example_input=x, r_init="identity")
    assert list(opt_layers(model)) == convs[:-1]
    _assert_same(_predict(model, x), ref)

    x = x.double()
    model = _calibrated(torchvision.models.squeezenet1_1(num_classes=10).double(), x)
    ref, wide = _predict(model, x), _conv_names(model, kernel_gt_1=True)
    convert(model, "decoupled", example_input=x, **IDENTITY_DC)
    replaced = [n for n, m in model.named_modules() if isinstance(m, DecoupledConv2d)]
    assert replaced == wide and len(wide) == 9  # the stem and the eight 3x3 expand convs
    _assert_same(_predict(model, x), ref)


def _vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # zero-initialized: every prediction would be the bias
    return model.eval()


def test_vision_transformer_attention_parts_reported_and_predictions_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _vit()
    ref = _predict(model, x)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    expected = ["conv_proj"] + [f"{b}.{n}" for b in blocks for n in ("self_attention.out_proj", "mlp.0", "mlp.3")]
    plan = plan_opt(model)
    assert plan.names == expected
    reasons = dict(plan.skipped)
    assert reasons["heads.head"] == OUTPUT
    for b in blocks:
        for part in "qkv":
            assert reasons[f"{b}.self_attention.in_proj_weight:{part}"].startswith("cannot transform: packed attention")
    # conv_proj: d = 3*8*8 = 192, n = 16: a 192x192 rotation is 11.9x its 3,088 parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPTSizeWarning)
        with pytest.raises(OPTSizeWarning, match=r"'conv_proj': a 192x192 rotation, 11\.9x its layer's parameters"):
            apply_opt(model, "cayley")
        before, shapes = _n_params(model), _weight_shapes(model, expected)
        apply_opt(model, "cayley", blocks=2, r_init="identity")  # 2 blocks of 96x96: no warning
    assert list(opt_layers(model)) == expected
    assert _n_params(model) == _expected_opt_count(before, shapes, lambda d: 2 * (d // 2) ** 2)
    _assert_same(_predict(model, x), ref)  # MHA's fused path reads out_proj's effective (parametrized) weight

    torch.manual_seed(0)
    model, x = _vit().double(), x.double()
    ref = _predict(model, x)
    with pytest.warns(UserWarning, match=r"out_proj.*reads out_proj\.weight directly"):
        convert(model, "decoupled", **IDENTITY_DC)
    replaced = [n for n, m in model.named_modules() if isinstance(m, (DecoupledConv2d, DecoupledLinear))]
    assert replaced == [n for n in expected if not n.endswith("out_proj")]
    _assert_same(_predict(model, x), ref)


# ---------------------------------------------------------------------------------------------- Transformer
def _encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()


def _layer_math(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """Post-norm encoder layer, computed module by module (so converted modules compute their own math)."""
    h = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
    return layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))


def _fused(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """torch's fused kernel, which reads linear1/2.weight as plain Linear weights."""
    a = layer.self_attn
    return torch._transformer_encoder_layer_fwd(
        x, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, False,
        False, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
        layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, None, None)


def test_transformer_encoder_layer_converted_predictions_follow_the_converted_layers():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    layer = _encoder_layer()
    convert(layer, "sphere", output_layer="none")
    assert type(layer.linear1) is SphereLinear and type(layer.linear2) is SphereLinear
    with torch.no_grad():
        out, expected, fused = layer(x), _layer_math(layer, x), _fused(layer, x)
        h = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
        first = sphere_linear(h, layer.linear1.weight, layer.linear1.bias, "cosine")
    torch.testing.assert_close(layer.linear1(h), first, rtol=0, atol=1e-6)  # the converted layer's own math
    assert (fused - expected).abs().max() > 0.05  # what the fast path would have returned
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

    # a stack with a padding mask: no nested-tensor fast path either
    torch.manual_seed(1)
    enc = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True).eval()
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    convert(enc, "sphere", output_layer="none")
    assert enc.use_nested_tensor is False
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = enc(x, src_key_padding_mask=mask)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(out, slow, rtol=0, atol=1e-5)


def test_transformer_encoder_layer_identity_transforms_keep_predictions():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    original = _encoder_layer()
    ref = _predict(original, x)
    dc = _encoder_layer().double()
    dc.load_state_dict(original.state_dict())
    ref64 = _predict(dc, x.double())
    convert(dc, "decoupled", output_layer="none", **IDENTITY_DC)
    assert type(dc.linear2) is DecoupledLinear
    _assert_same(_predict(dc, x.double()), ref64)

    opt = _encoder_layer()
    opt.load_state_dict(original.state_dict())
    apply_opt(opt, "cayley", output_layer="none", r_init="identity")
    assert list(opt_layers(opt)) == ["self_attn.out_proj", "linear1", "linear2"]
    _assert_same(_predict(opt, x), ref)
    # a random rotation: the fused eval path reads the effective weights W = R V
    apply_opt(rot := _encoder_layer(), "cayley", output_layer="none", seed=0)
    with torch.no_grad():
        torch.testing.assert_close(rot(x), _layer_math(rot, x), rtol=0, atol=1e-5)
        assert (rot(x) - _predict(_encoder_layer(), x)).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------- torch-geometric
def _graph():
    x = torch.randn(6, 8)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2], [1, 2, 3, 4, 5, 0, 0, 4]])
    return x, edge_index


@pytest.mark.parametrize("kind", ["GCN", "GraphSAGE"])
def test_torch_geometric_models(kind):
    from torch_geometric.nn import models
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    torch.manual_seed(0)
    x, ei = _graph()
    make = lambda: getattr(models, kind)(8, 16, num_layers=2, out_channels=4).eval()  # noqa: E731
    model = make()
    ref = _predict(model, x, ei)
    hidden = ["convs.0.lin"] if kind == "GCN" else ["convs.0.lin_l", "convs.0.lin_r"]
    output = ["convs.1.lin"] if kind == "GCN" else ["convs.1.lin_l", "convs.1.lin_r"]
    plan = plan_opt(model)
    assert plan.names == hidden and all((n, OUTPUT) in plan.skipped for n in output)
    apply_opt(model, "cayley", r_init="identity")
    assert list(opt_layers(model)) == hidden and all(isinstance(opt_layers(model)[n], PygLinear) for n in hidden)
    _assert_same(_predict(model, x, ei), ref)

    model = make().double()
    keys = set(model.state_dict())
    x = x.double()
    ref = _predict(model, x, ei)
    convert(model, "decoupled", **IDENTITY_DC)
    modules = dict(model.named_modules())
    assert [n for n in hidden + output if type(modules[n]) is DecoupledLinear] == hidden
    assert all(type(modules[n]) is PygLinear for n in output)
    assert set(model.state_dict()) >= keys  # the weights keep their state_dict keys
    _assert_same(_predict(model, x, ei), ref)


# ---------------------------------------------------------------------------------------------- ties, freezing...
class TiedLM(nn.Module):
    """LSTM language model whose decoder shares the embedding's weight."""

    def __init__(self, vocab: int = 20, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, hidden)
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(tokens))
        return F.log_softmax(self.decoder(torch.tanh(self.proj(h))), dim=-1)


def test_lstm_language_model_with_tied_embedding():
    torch.manual_seed(0)
    tokens = torch.randint(20, (2, 7))
    model = TiedLM().eval()
    ref = _predict(model, tokens)
    tied = model.embed.weight
    plan = plan_opt(model)
    assert plan.names == ["proj"] and ("decoder", OUTPUT) in plan.skipped
    assert dict(plan.skipped)["rnn.weight_ih_l0:i"].startswith("cannot transform: recurrent")
    # converting the tied decoder would break the tie: refused by name, nothing changed
    with pytest.raises(ValueError, match=r"weight of 'decoder' is tied to 'embed\.weight'.*exclude"):
        apply_opt(model, "cayley", output_layer="none", r_init="identity")
    assert not opt_layers(model) and model.decoder.weight is tied
    with pytest.warns(UserWarning, match="recurrent gate weight"):
        apply_opt(model, "cayley", r_init="identity")
    assert list(opt_layers(model)) == ["proj"]
    assert model.decoder.weight is tied and model.embed.weight is tied
    _assert_same(_predict(model, tokens), ref)

    # convert keeps the tie: the new decoder holds the embedding's own Parameter
    model = TiedLM().double().eval()
    tied, ref = model.embed.weight, _predict(model, tokens)
    convert(model, "decoupled", output_layer="none", **IDENTITY_DC)
    assert type(model.decoder) is DecoupledLinear and type(model.proj) is DecoupledLinear
    assert model.decoder.weight is tied and model.embed.weight is tied
    assert _n_params(model) == _n_params(TiedLM())  # nothing split into copies
    _assert_same(_predict(model, tokens), ref)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_frozen_layers_left_alone_by_default_and_kept_frozen_otherwise():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    base = _mlp()
    base[0].requires_grad_(False)
    ref = _predict(base, x)

    def fresh() -> nn.Sequential:
        m = _mlp()
        m.load_state_dict(base.state_dict())
        m[0].requires_grad_(False)
        return m

    model = fresh()
    plan = plan_opt(model)
    assert plan.names == ["2"] and ("0", "frozen") in plan.skipped
    apply_opt(model, "cayley", r_init="identity")
    assert list(opt_layers(model)) == ["2"] and not model[0].weight.requires_grad
    model = fresh()
    apply_opt(model, "cayley", r_init="identity", trainable_only=False)
    assert list(opt_layers(model)) == ["0", "2"]
    assert not model[0].parametrizations.weight.original.requires_grad and not model[0].bias.requires_grad
    assert model[2].parametrizations.weight.original.requires_grad
    _assert_same(_predict(model, x), ref)

    model = fresh()
    convert(model, "sphere")
    assert type(model[0]) is nn.Linear and not model[0].weight.requires_grad
    assert type(model[2]) is SphereLinear and model[2].weight.requires_grad
    model = fresh()
    shared_k = make_shared_k()
    convert(model, "sphere", angle_fn="learnable", k_sharing="per_filter", trainable_only=False)
    assert not model[0].k_raw.requires_grad and model[2].k_raw.requires_grad  # the operator's own k follows
    model = fresh()
    convert(model, "sphere", angle_fn="learnable", shared_k=shared_k, trainable_only=False)
    assert model[0].k_raw is shared_k and shared_k.requires_grad  # a k shared with trainable layers is not frozen
    model = fresh().double()
    ref = _predict(model, x.double())
    convert(model, "decoupled", trainable_only=False, **IDENTITY_DC)
    assert type(model[0]) is DecoupledLinear and type(model[2]) is DecoupledLinear
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    _assert_same(_predict(model, x.double()), ref)


def test_lazy_model_after_materialization_or_with_example_input():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'0' is lazy.*example_input"):
        apply_opt(lazy, "cayley")
    with pytest.raises(ValueError, match=r"'0' is lazy.*example_input"):
        convert(lazy, "sphere")
    apply_opt(lazy, "cayley", example_input=x, r_init="identity")  # the core's forward materializes it
    assert list(opt_layers(lazy)) == ["0"] and get_opt(lazy[0]).V.shape == (6, 8)

    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    ref = _predict(model, x)
    apply_opt(model, "cayley", r_init="identity")
    assert list(opt_layers(model)) == ["0"]
    _assert_same(_predict(model, x), ref)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = x.double()
    ref = _predict(model, x)
    convert(model, "decoupled", **IDENTITY_DC)
    assert type(model[0]) is DecoupledLinear and type(model[2]) is nn.Linear
    _assert_same(_predict(model, x), ref)


class Reuse(nn.Module):
    """One Linear registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_module_reuse_converted_once_and_serving_both_uses():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = Reuse()
    ref = _predict(model, x)
    plan = plan_opt(model)
    assert plan.names == ["a"] and ("b", "tie duplicate of a") in plan.skipped
    before = _n_params(model)
    apply_opt(model, "cayley", r_init="identity")
    assert model.a is model.b and parametrize.is_parametrized(model.b, "weight")
    assert _n_params(model) == before - 64 + 64  # one 8x8 P replaces the one 8x8 weight
    _assert_same(_predict(model, x), ref)

    model, x64 = Reuse().double(), x.double()
    weight, ref = model.a.weight, _predict(model, x64)
    convert(model, "decoupled", **IDENTITY_DC)
    assert type(model.a) is DecoupledLinear and model.a is model.b and model.a.weight is weight
    _assert_same(_predict(model, x64), ref)
    model = Reuse()
    convert(model, "sphere")
    with torch.no_grad():
        h = torch.tanh(sphere_linear(x, model.a.weight, model.a.bias, "cosine"))
        expected = model.head(torch.tanh(sphere_linear(h, model.a.weight, model.a.bias, "cosine")))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_compiled_model_transformed_in_place_without_graph_breaks():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    base = _mlp()
    ref = _predict(base, x)
    compiled = torch.compile(base, backend="eager")
    assert [g.name for g in select_neurons(compiled)] == ["_orig_mod.0", "_orig_mod.2", "_orig_mod.4"]
    apply_opt(compiled, "cayley", r_init="identity")
    assert list(opt_layers(compiled)) == ["_orig_mod.0", "_orig_mod.2"]
    _assert_same(_predict(compiled, x), ref)
    explanation = torch._dynamo.explain(base)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    base, x = _mlp().double(), x.double()
    ref = _predict(base, x)
    compiled = torch.compile(base, backend="eager")
    _predict(compiled, x)  # compiled before the transform: guards see the new modules and retrace
    convert(compiled, "decoupled", **IDENTITY_DC)
    assert [type(base[i]).__name__ for i in (0, 2, 4)] == ["DecoupledLinear", "DecoupledLinear", "Linear"]
    _assert_same(_predict(compiled, x), ref)
