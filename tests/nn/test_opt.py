"""OPT layers: the parametrization W = R·V, energy invariance, PE-OPT/S-OPT, refinement, OGD, errors."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_hyper.functional.energy import hyperspherical_energy
from lightning_hyper.functional.orthogonal import cayley, gram_schmidt, orthogonality_error
from lightning_hyper.nn.opt import (
    OPTSizeWarning,
    StiefelCayleySGD,
    absorb_rotation,
    apply_opt,
    attach_ogd,
    get_opt,
    opt_layers,
    orthogonality_errors,
    refine_v,
    remove_opt,
    rotation_parameters,
    sopt_resample,
    split_opt_parameters,
)

EXACT = ["cayley", "gram_schmidt", "householder", "lowdin", "matrix_exp"]


def _mlp(dtype=torch.float32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def test_conv_shape_mapping_and_identity_init():
    conv = nn.Conv2d(3, 8, 3)
    w0 = conv.weight.detach().clone()
    apply_opt(conv, "cayley", output_layer="none", r_init="identity")
    P = conv.parametrizations.weight.original
    assert P.shape == (27, 27)
    assert get_opt(conv).V.shape == (27, 8)
    assert conv.weight.shape == (8, 3, 3, 3)
    assert torch.allclose(conv.weight, w0, atol=1e-6)  # R = I: weight = V reshaped
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, w0, conv.bias), atol=1e-5)


def test_weight_is_R_times_V_with_neurons_as_rows():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, groups=2).double()  # d = (4/2)·3 = 6
    w0 = conv.weight.detach().clone()
    apply_opt(conv, "gram_schmidt", output_layer="none", seed=1)
    P = conv.parametrizations.weight.original.detach()
    V = w0.reshape(6, 6).T  # columns = neurons, fan-in flattened as (C_in, k)
    expected = (gram_schmidt(P) @ V).T.reshape(6, 2, 3)
    assert torch.allclose(conv.weight, expected, atol=1e-12)
    lin = nn.Linear(7, 3).double()
    v = lin.weight.detach().clone()
    apply_opt(lin, "cayley", output_layer="none", seed=2)
    R = cayley(lin.parametrizations.weight.original.detach())
    assert torch.allclose(lin.weight, (R @ v.T).T, atol=1e-12)


@pytest.mark.parametrize("method", EXACT + ["ogd"])
def test_energy_and_gram_invariance(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.Flatten(), nn.Linear(12, 4)).double()
    conv = model[0]
    V = conv.weight.detach().reshape(12, -1).clone()
    apply_opt(model, method, seed=0, **({"r_init": "orthogonal"} if method == "ogd" else {}))
    assert set(opt_layers(model)) == {"0"}  # the output layer stays standard
    W = conv.weight.detach().reshape(12, -1)
    assert not torch.allclose(W, V)
    assert torch.allclose(W @ W.T, V @ V.T, atol=1e-10)
    for kwargs in ({"s": 0.0}, {"s": 1.0}, {"s": 2.0, "half_space": True}, {"s": 1.0, "metric": "angular"}):
        e_v, e_w = hyperspherical_energy(V, **kwargs), hyperspherical_energy(W, **kwargs)
        assert abs(e_w.item() - e_v.item()) <= 1e-10 * abs(e_v.item())


def test_only_rotation_and_bias_train_and_v_is_a_buffer():
    torch.manual_seed(0)
    model = _mlp()
    apply_opt(model, "cayley")
    rot, rest = split_opt_parameters(model)
    assert len(rot) == 2 and [p.shape for p in rot] == [(6, 6), (10, 10)]
    names = dict(model.named_parameters())
    assert "0.parametrizations.weight.original" in names and "2.weight" not in names
    assert all("V" not in n for n in names)
    V0 = get_opt(model[0]).V.clone()
    P0 = rot[0].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(16, 6)).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.equal(get_opt(model[0]).V, V0)
    assert not torch.equal(rot[0].detach(), P0)
    assert orthogonality_errors(model)["0"] < 1e-5


def test_state_dict_roundtrip_remove_and_absorb():
    torch.manual_seed(0)
    a, b = _mlp(), _mlp()
    apply_opt(a, "householder", seed=0)
    apply_opt(b, "householder", seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 6)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    # absorb: V <- R V, P <- I; the function is unchanged
    y = a(x)
    absorb_rotation(a)
    assert torch.allclose(a(x), y, atol=1e-5)
    assert torch.allclose(a[0].parametrizations.weight.original, torch.eye(6))
    # assigning a weight: V <- W, R = I, weight == W exactly
    W = torch.randn(10, 6)
    a[0].weight = W
    assert torch.allclose(a[0].weight, W, atol=1e-6)
    # remove: a plain network with the same outputs and the baseline's parameter count
    y = b(x)
    n_plain = sum(p.numel() for p in _mlp().parameters())
    remove_opt(b)
    assert not opt_layers(b) and isinstance(b[0].weight, nn.Parameter)
    assert sum(p.numel() for p in b.parameters()) == n_plain
    assert torch.allclose(b(x), y, atol=1e-6)


def test_torch_geometric_linear_inside_gcnconv():
    from torch_geometric.nn import GCNConv
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    torch.manual_seed(0)
    convs = nn.ModuleList([GCNConv(8, 6), GCNConv(6, 3)])
    apply_opt(convs, "cayley", seed=0)
    assert list(opt_layers(convs)) == ["0.lin"] and isinstance(convs[0].lin, PygLinear)
    sd = convs.state_dict()
    assert "0.lin.weight" not in sd and "0.lin.parametrizations.weight.original" in sd
    other = nn.ModuleList([GCNConv(8, 6), GCNConv(6, 3)])
    apply_opt(other, "cayley", seed=5)
    other.load_state_dict(sd)  # strict
    x, ei = torch.randn(5, 8), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    assert torch.allclose(convs[1](convs[0](x, ei), ei), other[1](other[0](x, ei), ei), atol=1e-6)
    lazy = nn.ModuleList([GCNConv(-1, 4), GCNConv(4, 2)])
    with pytest.raises(ValueError, match="lazy"):
        apply_opt(lazy, "cayley")


def test_pe_opt_blocks_parameter_counts_and_channel_locality():
    conv = nn.Conv2d(64, 8, 3)  # d = 576
    counts = {}
    for blocks, shared in [(1, False), (2, True), (2, False), (64, True), (64, False)]:
        c = nn.Conv2d(64, 8, 3)
        apply_opt(c, "cayley", output_layer="none", blocks=blocks, shared_blocks=shared)
        counts[(blocks, shared)] = c.parametrizations.weight.original.numel()
        assert orthogonality_errors(c)[""] < 1e-5
    assert counts == {(1, False): 331_776, (2, True): 82_944, (2, False): 165_888, (64, True): 81, (64, False): 5_184}
    conv = nn.Conv2d(4, 5, 3).double()
    apply_opt(conv, "cayley", output_layer="none", blocks=2)
    P = conv.parametrizations.weight.original
    w0 = conv.weight.detach().clone()
    with torch.no_grad():
        P[0] += torch.randn_like(P[0])  # change block 0 only
    diff = (conv.weight.detach() - w0).abs().sum(dim=(0, 2, 3))
    assert (diff[:2] > 0).all() and torch.equal(diff[2:], torch.zeros(2, dtype=torch.float64))
    # the dense rotation is block diagonal and orthogonal
    R = get_opt(conv).full_rotation(P.detach())
    assert orthogonality_error(R) < 1e-10 and R[:18, 18:].abs().max() == 0


def test_sopt_layers_resample_and_keep_energy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    V0 = model[0].weight.detach().clone()
    apply_opt(model, "gram_schmidt", sopt=True, seed=0)
    param = get_opt(model[0])
    assert param.indices.numel() == 4 and model[0].parametrizations.weight.original.shape == (4, 4)
    assert torch.allclose(model[0].weight, V0)  # S-OPT starts at R' = I
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randint(3, (64,))
    losses = []
    gen = torch.Generator().manual_seed(0)
    for episode in range(4):
        for _ in range(10):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        W = model[0].weight.detach()
        rest = torch.ones(16, dtype=torch.bool)
        rest[param.indices] = False
        assert torch.equal(W[:, rest], param.V.T[:, rest])  # only the drawn coordinates move
        out = model(x)
        idx = param.indices.clone()
        assert sopt_resample(model, opt, generator=gen) == 1
        assert torch.allclose(model(x), out, atol=1e-10)  # continuous at the re-draw
        assert torch.equal(model[0].parametrizations.weight.original, torch.eye(4, dtype=torch.float64))
        assert model[0].parametrizations.weight.original not in opt.state
        assert not torch.equal(param.indices, idx) or episode == 0
    assert losses[-1] < losses[0]
    W = model[0].weight.detach()
    assert torch.allclose(W @ W.T, V0 @ V0.T, atol=1e-10)  # energy of V kept across episodes


def _np_hs_energy(neurons: np.ndarray, eps: float = 1e-6) -> float:
    """Half-space Riesz s=2 mean energy over the 2N points ±ŵ_i (ordered pairs)."""
    u = neurons / np.linalg.norm(neurons, axis=1, keepdims=True)
    pts = np.concatenate([u, -u])
    total, count = 0.0, 0
    for i in range(len(pts)):
        for j in range(len(pts)):
            if i != j:
                total += 1.0 / (np.sum((pts[i] - pts[j]) ** 2) + eps)
                count += 1
    return total / count


def test_refinement_lowers_the_energy_of_v():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, 3).double()
    apply_opt(conv, "cayley", output_layer="none", seed=0)
    param = get_opt(conv)
    V0 = param.V.clone()
    before_ref = _np_hs_energy(V0.T.numpy())
    before, after = refine_v(conv, objective="hs_mhe", steps=150, lr=1.0)
    assert before == pytest.approx(before_ref, rel=1e-9)
    assert after == pytest.approx(_np_hs_energy(param.V.T.numpy()), rel=1e-9)
    assert after < before - 1e-3
    assert torch.allclose(param.V.norm(dim=0), V0.norm(dim=0), atol=1e-12)  # norms restored
    b2, a2 = refine_v(conv, objective="mhe", steps=20)
    assert a2 < b2
    # through apply_opt
    lin = nn.Linear(10, 20)
    apply_opt(lin, "cayley", output_layer="none", refine="hs_mhe", refine_steps=30, seed=0)
    e_lin = hyperspherical_energy(lin.weight.detach(), half_space=True)
    e_ref = hyperspherical_energy(nn.Linear(10, 20).weight.detach(), half_space=True)
    assert e_lin < e_ref + 0.05


def _procrustes(solve, reorth_every=0, steps=400, lr=0.05):
    torch.manual_seed(0)
    d, n = 12, 20
    V = torch.randn(d, n, dtype=torch.float64)
    target = cayley(torch.randn(d, d, dtype=torch.float64)) @ V
    X = nn.Parameter(torch.eye(d, dtype=torch.float64))
    opt = StiefelCayleySGD([X], lr=lr, momentum=0.9, solve=solve, reorth_every=reorth_every)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ V - target) ** 2).sum() / n
        loss.backward()
        opt.step()
    return loss.item(), orthogonality_error(X.detach()).item()


def test_ogd_optimizer_converges_on_procrustes_and_stays_orthogonal():
    loss, err = _procrustes("exact")
    assert loss < 1e-8 and err < 1e-10
    _, err_fp = _procrustes("fixed_point", steps=100)
    _, err_fp_reorth = _procrustes("fixed_point", reorth_every=10, steps=100)
    assert err_fp > 1e-6  # the 2-iteration scheme drifts...
    assert err_fp_reorth < 1e-10  # ...unless re-orthogonalized
    # float32, many noisy steps: rounding accumulates in the exact solve unless polished (default)
    errs = {}
    for polish in (False, True):
        torch.manual_seed(0)
        X = nn.Parameter(torch.eye(24))
        opt = StiefelCayleySGD([X], lr=0.05, polish=polish)
        for _ in range(1500):
            opt.zero_grad()
            X.grad = torch.randn(24, 24)
            opt.step()
        errs[polish] = orthogonality_error(X.detach()).item()
    assert errs[True] < 1e-6 < errs[False]


def test_attach_ogd_to_a_main_optimizer():
    torch.manual_seed(0)
    model = _mlp()
    apply_opt(model, "ogd")
    rot, rest = split_opt_parameters(model)
    main = torch.optim.Adam(rest, lr=1e-2)
    with pytest.raises(ValueError, match="main optimizer"):
        attach_ogd(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ogd = attach_ogd(main, model, lr=0.05)
    x, y = torch.randn(64, 6), torch.randint(3, (64,))
    first = None
    for _ in range(60):
        main.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        main.step()
        first = first if first is not None else loss.item()
        assert all(p.grad is None for p in rot)  # OGD consumed and cleared them
    assert loss.item() < first
    assert not torch.allclose(rot[0].detach(), torch.eye(6))
    assert max(orthogonality_errors(model).values()) < 1e-5
    ogd.hook_handle.remove()


def test_relaxed_and_unconstrained_use_p_directly():
    torch.manual_seed(0)
    for method in ("relaxed", "or", "unconstrained", "upt"):
        lin = nn.Linear(5, 4)
        v = lin.weight.detach().clone()
        apply_opt(lin, method, output_layer="none")
        P = lin.parametrizations.weight.original.detach()
        assert orthogonality_error(P) < 1e-5  # orthogonal init by default
        assert torch.allclose(lin.weight, (P @ v.T).T, atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="accepted values"):
        apply_opt(_mlp(), "givens")
    with pytest.raises(TypeError, match="cannot convert"):
        apply_opt(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), "cayley", include="0")
    with pytest.raises(TypeError, match="cannot convert"):
        apply_opt(nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.Linear(3, 2)), "cayley", include="0")
    with pytest.raises(ValueError, match="matches no module"):
        apply_opt(_mlp(), "cayley", include="backbone.*")
    with pytest.raises(ValueError, match="does not divide"):
        apply_opt(nn.Linear(6, 4), "cayley", output_layer="none", blocks=4)
    m = _mlp()
    apply_opt(m, "cayley")
    with pytest.raises(ValueError, match="already"):
        apply_opt(m, "cayley", include="0")
    with pytest.raises(ValueError, match="r_init"):
        apply_opt(_mlp(), "cayley", r_init="xavier")
    with pytest.raises(ValueError, match="orthogonal starting point"):
        apply_opt(_mlp(), "ogd", r_init="normal")
    with pytest.raises(ValueError, match="refine"):
        apply_opt(_mlp(), "cayley", refine="energy")
    with pytest.raises(ValueError, match="does not map P = I"):
        apply_opt(_mlp(), "householder", sopt=True, full=False)
    zero = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    nn.init.zeros_(zero[0].weight)
    with pytest.raises(ValueError, match="all-zero"):
        apply_opt(zero, "cayley", include="0")
    # R dimension mismatch: a P of the wrong size (e.g. from another model's state)
    lin = nn.Linear(4, 3)
    apply_opt(lin, "cayley", output_layer="none")
    with pytest.raises(ValueError, match="R dimension mismatch"):
        get_opt(lin).rotation(torch.randn(5, 5))
    with pytest.raises(TypeError, match="OPT layer"):
        refine_v(nn.Linear(3, 3))
    assert rotation_parameters(nn.Linear(2, 2)) == []


# ---------------------------------------------------------------------------------------------- selection (core)
def test_deprecated_argument_names_still_work_and_map_to_the_new_ones():
    with pytest.warns(DeprecationWarning, match=r"apply_opt\(layers='4'\) is deprecated; use include="):
        m = apply_opt(_mlp(), "cayley", layers="4")
    assert list(opt_layers(m)) == ["4"]  # as before: layers= converts what it names, the output layer too
    with pytest.warns(DeprecationWarning, match=r"exclude_output=False.*output_layer='none'"):
        m = apply_opt(_mlp(), "cayley", exclude_output=False)
    assert list(opt_layers(m)) == ["0", "2", "4"]
    with pytest.warns(DeprecationWarning, match="exclude_output"):
        m = apply_opt(_mlp(), "cayley", exclude_output=True)
    assert list(opt_layers(m)) == ["0", "2"]
    with pytest.raises(ValueError, match=r"layers= \(deprecated\) and include= were both given; pass only include="):
        apply_opt(_mlp(), "cayley", include="0", layers="2")
    with pytest.raises(ValueError, match=r"exclude_output= .* output_layer="):
        apply_opt(_mlp(), "cayley", exclude_output=False, output_layer="4")


def test_new_argument_names_and_string_patterns():
    m = apply_opt(_mlp(), "cayley", exclude="0")  # one pattern, not the characters of "0"
    assert list(opt_layers(m)) == ["2"]
    m = apply_opt(_mlp(), "cayley", include="[02]")
    assert list(opt_layers(m)) == ["0", "2"]
    m = apply_opt(_mlp(), "cayley", output_layer="none", layer_types="Linear")
    assert list(opt_layers(m)) == ["0", "2", "4"]
    m = apply_opt(_mlp(), "cayley", output_layer="2")  # the named layer stays standard instead of the last one
    assert list(opt_layers(m)) == ["0", "4"]
    with pytest.raises(ValueError, match=r"include='4' selects only the output layer '4'.*output_layer='none'"):
        apply_opt(_mlp(), "cayley", include="4")
    with pytest.raises(ValueError, match=r"output_layer='fc'.*available names"):
        apply_opt(_mlp(), "cayley", output_layer="fc")


def test_tied_weight_is_refused_by_name_before_anything_changes():
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    shared[2].weight = shared[0].weight
    with pytest.raises(ValueError, match=r"weight of '0' is tied to '2\.weight'.*exclude=\['0'\]"):
        apply_opt(shared, "cayley")
    assert not opt_layers(shared) and shared[2].weight is shared[0].weight
    # a layer that fails late (blocks) leaves the earlier ones untouched too
    m2 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"layer '2': blocks=4 does not divide the neuron dimension d=6"):
        apply_opt(m2, "cayley", blocks=4)
    assert not opt_layers(m2)


def test_size_warning_names_the_multiplier_and_the_cheaper_options():
    def wide() -> nn.Sequential:
        return nn.Sequential(nn.Linear(100, 4), nn.ReLU(), nn.Linear(4, 3))  # d = 100, n = 4

    before = 100 * 4 + 4 + 4 * 3 + 3
    after = before - 400 + 100 * 100
    with pytest.warns(UserWarning) as record:
        apply_opt(wide(), "cayley")
    size = [w for w in record if issubclass(w.category, OPTSizeWarning)]
    assert len(size) == 1
    msg = str(size[0].message)
    assert f"{after / before:.1f}x the model's parameters ({before:,} -> {after:,})" in msg
    assert "'0': a 100x100 rotation, 24.8x its layer's parameters" in msg  # 10,000 / 404
    assert "blocks=k" in msg and "sopt=True" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPTSizeWarning)
        apply_opt(wide(), "cayley", sopt=True)  # (25)^2 = 625 parameters
        apply_opt(wide(), "cayley", blocks=4)  # 4 * 25^2 = 2,500
        apply_opt(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2)), "cayley")  # 3x3, C->C: 8.9x
        with pytest.raises(OPTSizeWarning, match=r"'0': a 2100x2100 rotation, 1\.0x.*larger than 2048x2048"):
            apply_opt(nn.Sequential(nn.Linear(2100, 2100), nn.Linear(2100, 2)), "cayley")


@pytest.mark.parametrize("method,kwargs", [(m, {}) for m in EXACT] + [
    ("ogd", {}), ("relaxed", {}), ("cayley", {"sopt": True}), ("gram_schmidt", {"sopt": True}),
    ("cayley", {"blocks": 2}), ("lowdin", {"blocks": 2, "shared_blocks": True})])
def test_no_graph_break_under_torch_compile(method, kwargs):
    """The orthogonalization's data checks (scale of P, NaN, rank, S-OPT indices) read no value on the host
    under torch.compile: one graph, no break, in every forward pass."""
    model = _mlp()
    apply_opt(model, method, seed=0, **kwargs)
    explanation = torch._dynamo.explain(model)(torch.randn(5, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_checks_still_fire_inside_a_compiled_graph():
    model = _mlp()
    apply_opt(model, "cayley", seed=0)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(5, 6)
    torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        compiled(x)


@pytest.mark.slow
def test_inductor_compiled_opt_model_matches_eager():
    torch.manual_seed(0)
    model = _mlp()
    apply_opt(model, "cayley", seed=0)
    x = torch.randn(5, 6)
    compiled = torch.compile(model)
    out = compiled(x)
    out.pow(2).sum().backward()
    grad = model[0].parametrizations.weight.original.grad.clone()
    model.zero_grad()
    ref = model(x)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, model[0].parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)
