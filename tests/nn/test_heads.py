"""Angular-margin heads: parity with pytorch-metric-learning, loss identities, gradients, λ, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss, LargeMarginSoftmaxLoss, SphereFaceLoss

from lightning_hyper.functional.margin import lambda_schedule
from lightning_hyper.nn import (
    HEADS,
    AngularMarginHead,
    ArcFaceHead,
    ASoftmaxHead,
    CosFaceHead,
    LSoftmaxHead,
    ModifiedSoftmaxHead,
    NormFaceHead,
    build_head,
)

D = torch.float64
B, DIM, K = 32, 16, 10


def data(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, DIM, generator=g, dtype=D) * scale
    y = torch.randint(0, K, (B,), generator=g)
    return x, y


def loss_and_grads(head, x, y):
    x = x.clone().requires_grad_(True)
    head.zero_grad()
    loss = F.cross_entropy(head(x, y), y)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad.clone()


def pml_loss_and_grads(loss_fn, x, y):
    x = x.clone().requires_grad_(True)
    loss_fn.zero_grad()
    loss = loss_fn(x, y)
    loss.backward()
    return loss.detach(), x.grad, loss_fn.W.grad.t().clone()


def assert_same(ours, theirs, atol=1e-6):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=atol, atol=atol)


# ----------------------------------------------------------------------- pml parity (λ = 0)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_lsoftmax_equals_pml_large_margin_softmax(m):
    x, y = data(m)
    pml = LargeMarginSoftmaxLoss(num_classes=K, embedding_size=DIM, margin=m).to(D)
    head = LSoftmaxHead(DIM, K, m=m, lambda_schedule="none").to(D)
    with torch.no_grad():
        head.weight.copy_(pml.W.t())  # pml stores W as (embedding, classes)
    assert head.lambda_ == 0.0
    assert_same(loss_and_grads(head, x, y), pml_loss_and_grads(pml, x, y), atol=1e-10)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_asoftmax_equals_pml_sphereface(m):
    x, y = data(10 + m)
    pml = SphereFaceLoss(num_classes=K, embedding_size=DIM, margin=m).to(D)
    head = ASoftmaxHead(DIM, K, m=m, lambda_schedule="none").to(D)
    with torch.no_grad():
        head.weight.copy_(pml.W.t())
    assert_same(loss_and_grads(head, x, y), pml_loss_and_grads(pml, x, y), atol=1e-10)


def test_asoftmax_equals_pml_in_float32():
    x, y = data(5)
    pml = SphereFaceLoss(num_classes=K, embedding_size=DIM, margin=4)
    head = ASoftmaxHead(DIM, K, m=4, lambda_schedule="none")
    with torch.no_grad():
        head.weight.copy_(pml.W.t())
    assert_same(loss_and_grads(head, x.float(), y), pml_loss_and_grads(pml, x.float(), y), atol=1e-5)


def test_additive_heads_equal_pml_cosface_and_arcface():
    x, y = data(7)
    pml = CosFaceLoss(num_classes=K, embedding_size=DIM, margin=0.35, scale=64).to(D)
    head = CosFaceHead(DIM, K, m=0.35, feature_scale=64).to(D)
    with torch.no_grad():
        head.weight.copy_(pml.W.t())
    assert_same(loss_and_grads(head, x, y), pml_loss_and_grads(pml, x, y), atol=1e-10)
    pml = ArcFaceLoss(num_classes=K, embedding_size=DIM, margin=math.degrees(0.5), scale=64).to(D)
    head = ArcFaceHead(DIM, K, m=0.5, feature_scale=64).to(D)
    with torch.no_grad():
        head.weight.copy_(pml.W.t())
    assert_same(loss_and_grads(head, x, y), pml_loss_and_grads(pml, x, y), atol=1e-10)


# --------------------------------------------------------------------------- loss identities
def test_m1_and_no_margin_identities():
    x, y = data(1)
    ls = LSoftmaxHead(DIM, K, m=1, lambda_schedule="none").to(D)
    torch.testing.assert_close(F.cross_entropy(ls(x, y), y), F.cross_entropy(x @ ls.weight.T, y), rtol=0, atol=1e-13)
    a = ASoftmaxHead(DIM, K, m=1, lambda_schedule="none").to(D)
    wn = F.normalize(a.weight, dim=1)
    torch.testing.assert_close(F.cross_entropy(a(x, y), y), F.cross_entropy(x @ wn.T, y), rtol=0, atol=1e-13)
    mod = ModifiedSoftmaxHead(DIM, K).to(D)
    mod.load_state_dict(a.state_dict())
    torch.testing.assert_close(mod(x, y), a(x, y), rtol=0, atol=1e-13)
    norm = NormFaceHead(DIM, K, feature_scale=10.0).to(D)
    torch.testing.assert_close(norm(x, y), 10.0 * F.normalize(x, dim=1) @ F.normalize(norm.weight, dim=1).T)


def test_huge_lambda_recovers_plain_softmax_and_monotonicity():
    x, y = data(2)
    losses_lam = []
    for lam in [0.0, 1.0, 5.0, 100.0, 1000.0]:
        h = ASoftmaxHead(DIM, K, m=4, lambda_schedule="constant", lambda_base=lam).to(D)
        h.weight.data = torch.randn(K, DIM, generator=torch.Generator().manual_seed(0), dtype=D)
        assert h.lambda_ == lam
        losses_lam.append(F.cross_entropy(h(x, y), y).item())
    assert all(a >= b for a, b in zip(losses_lam, losses_lam[1:]))  # non-increasing in λ
    h = ASoftmaxHead(DIM, K, m=4, lambda_schedule="constant", lambda_base=1e9).to(D)
    plain = F.cross_entropy(x @ F.normalize(h.weight, dim=1).T, y)
    assert abs(F.cross_entropy(h(x, y), y).item() - plain.item()) < 1e-6
    losses_m = []
    w = torch.randn(K, DIM, dtype=D)
    for m in [1, 2, 3, 4, 5]:
        h = ASoftmaxHead(DIM, K, m=m, lambda_schedule="none").to(D)
        h.weight.data = w.clone()
        losses_m.append(F.cross_entropy(h(x, y), y).item())
    assert all(a <= b + 1e-12 for a, b in zip(losses_m, losses_m[1:]))  # non-decreasing in m
    assert losses_m[-1] > losses_m[0] + 1.0


def test_non_target_logits_untouched_and_inference_ignores_margin():
    x, y = data(3)
    h = ASoftmaxHead(DIM, K, m=4, lambda_schedule="constant", lambda_base=0.7).to(D)
    plain = h(x)
    with_margin = h(x, y)
    mask = F.one_hot(y, K).bool()
    torch.testing.assert_close(with_margin[~mask], plain[~mask], rtol=0, atol=0)
    assert (with_margin[mask] <= plain[mask] + 1e-12).all()  # psi <= cos: the target is made harder
    torch.testing.assert_close(plain, x @ F.normalize(h.weight, dim=1).T)
    h.lambda_ = 123.0
    torch.testing.assert_close(h(x), plain, rtol=0, atol=0)  # λ never affects inference logits
    h.eval()
    torch.testing.assert_close(h(x), plain, rtol=0, atol=0)


def test_lambda_mixture_formula():
    x, y = data(4)
    lam = 3.0
    h = LSoftmaxHead(DIM, K, m=3, lambda_schedule="constant", lambda_base=lam).to(D)
    h0 = LSoftmaxHead(DIM, K, m=3, lambda_schedule="none").to(D)
    h0.weight.data = h.weight.data.clone()
    idx = y[:, None]
    expected = (lam * h(x).gather(1, idx) + h0(x, y).gather(1, idx)) / (1 + lam)
    torch.testing.assert_close(h(x, y).gather(1, idx), expected)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("cls", [ASoftmaxHead, LSoftmaxHead])
def test_gradcheck(cls, m):
    h = cls(5, 4, m=m, lambda_schedule="constant", lambda_base=0.5).to(D)
    x = torch.randn(6, 5, dtype=D, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    w = h.weight.detach().clone().requires_grad_(True)
    h.eval()  # no counter advance inside gradcheck's repeated forwards (λ is constant anyway)
    assert torch.autograd.gradcheck(lambda a, b: _functional(h, a, b, y), (x, w))


def _functional(head, x, w, y):
    """Run the head with ``w`` substituted for its parameter (so gradcheck can differentiate in w)."""
    return torch.func.functional_call(head, {"weight": w}, (x, y))


def test_m2_closed_form_gradient_eq_2_12():
    """L-Softmax m=2 target logit and its input gradient (thesis Eq. 2.11-2.13) vs autograd."""
    torch.manual_seed(0)
    h = LSoftmaxHead(DIM, K, m=2, lambda_schedule="none").to(D)
    for trial in range(20):
        x = torch.randn(1, DIM, dtype=D, requires_grad=True)
        y = torch.tensor([trial % K])
        f = h(x, y)[0, y]
        (gx,) = torch.autograd.grad(f.sum(), x)
        w, xv = h.weight[y[0]].detach(), x.detach()[0]
        wx, nw, nx = w @ xv, w.norm(), xv.norm()
        k = 1.0 if wx / (nw * nx) <= 0 else 0.0
        s = (-1.0) ** k
        f_ref = s * 2 * wx**2 / (nw * nx) - (2 * k + s) * nw * nx
        g_ref = s * (4 * wx * w / (nw * nx) - 2 * wx**2 * xv / (nw * nx**3)) - (2 * k + s) * nw * xv / nx
        assert f.item() == pytest.approx(f_ref.item(), abs=1e-10)
        torch.testing.assert_close(gx[0], g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [ASoftmaxHead, LSoftmaxHead, ArcFaceHead])
def test_finite_gradients_for_parallel_antiparallel_and_orthogonal_features(cls):
    h = cls(4, 3, lambda_schedule="none").to(D)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]], dtype=D) * 2)
    x = torch.tensor([[3.0, 0, 0, 0], [-2.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 1.0]], dtype=D, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0])  # parallel, anti-parallel, orthogonal (c = 0), orthogonal to all
    loss = F.cross_entropy(h(x, y), y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(h.weight.grad).all()


# ------------------------------------------------------------------------- gradient modes
def caffe_reference_grad_x(x, w_hat, y, g, m, lam):
    """Literal per-sample loops of the SphereFace Caffe Backward_cpu (m = 2 DOUBLE and m = 4 QUADRUPLE)."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        xn = x[i].norm()
        for j in range(w_hat.shape[0]):
            if j != y[i]:
                out[i] += g[i, j] / (1 + lam) * w_hat[j]
                continue
            c = (x[i] @ w_hat[j]) / xn
            s0 = torch.sign(c)
            if m == 2:
                cw = 4 * s0 * c
                cx = -1 / xn * (2 * s0 * c * c + 1)
            else:  # m == 4
                s3 = s0 * torch.sign(2 * c * c - 1)
                s4 = 2 * s0 + s3 - 3
                cw = s3 * (32 * c**3 - 16 * c)
                cx = -1 / xn * (s3 * (24 * c**4 - 8 * c**2 - 1) - s4)
            nrm = torch.sqrt(cw * cw + cx * cx)
            out[i] += g[i, j] / (1 + lam) * (cw / nrm * w_hat[j] + cx / nrm * x[i])
    return out + lam / (1 + lam) * g @ w_hat


def test_caffe_normalized_without_projection_warns():
    with pytest.warns(UserWarning, match="weight_norm_mode='project'"):
        ASoftmaxHead(DIM, K, gradient_mode="caffe_normalized")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ASoftmaxHead(DIM, K, gradient_mode="caffe_normalized", weight_norm_mode="project")
        ASoftmaxHead(DIM, K)


@pytest.mark.parametrize("m", [2, 4])
def test_caffe_normalized_gradient_mode(m):
    x, y = data(20 + m)
    lam = 2.0
    exact = ASoftmaxHead(DIM, K, m=m, lambda_schedule="constant", lambda_base=lam, weight_norm_mode="project").to(D)
    caffe = ASoftmaxHead(DIM, K, m=m, lambda_schedule="constant", lambda_base=lam, weight_norm_mode="project",
                         gradient_mode="caffe_normalized").to(D)
    caffe.load_state_dict(exact.state_dict())
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    le, lc = exact(xe, y), caffe(xc, y)
    torch.testing.assert_close(lc, le, rtol=0, atol=1e-12)  # same forward
    g = torch.randn_like(lc)
    lc.backward(g)
    w_hat = caffe.weight.detach()
    torch.testing.assert_close(caffe.weight.grad, g.T @ x)  # plain inner-product weight gradient
    torch.testing.assert_close(xc.grad, caffe_reference_grad_x(x, w_hat, y, g, m, lam), rtol=1e-10, atol=1e-10)
    le.backward(g)
    assert not torch.allclose(xe.grad, xc.grad)  # the two modes really differ


def test_project_mode_renormalizes_rows_and_matches_reparam():
    x, y = data(6)
    a = ASoftmaxHead(DIM, K, lambda_schedule="none").to(D)
    p = ASoftmaxHead(DIM, K, lambda_schedule="none", weight_norm_mode="project").to(D)
    p.load_state_dict(a.state_dict())
    with torch.no_grad():
        p.weight.mul_(3.0)
    assert not torch.allclose(p.weight.norm(dim=1), torch.ones(K, dtype=D))
    torch.testing.assert_close(p(x, y), a(x, y))
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(K, dtype=D))


# ------------------------------------------------------------------------------ λ / state
def test_global_step_drives_lambda_and_is_saved():
    h = ASoftmaxHead(DIM, K)
    assert h.lambda_ == pytest.approx(lambda_schedule(1))
    h.global_step = 999
    assert h.lambda_ == pytest.approx(8.2645, rel=1e-4) and h.lambda_at(999) == h.lambda_
    x, y = data(0)
    x = x.float()
    h(x, y)  # plain-PyTorch use: a training forward with labels advances the counter
    assert h.global_step == 1000 and h.lambda_ == pytest.approx(lambda_schedule(1001))
    h.eval()
    h(x, y)
    h.train()
    with torch.no_grad():
        h(x, y)
    h(x)
    assert h.global_step == 1000  # no advance in eval, under no_grad, or without labels
    h.auto_step = False  # driven from outside (SphereFaceModule sets it from trainer.global_step)
    h(x, y)
    assert h.global_step == 1000
    h2 = ASoftmaxHead(DIM, K)
    h2.load_state_dict(h.state_dict())
    assert h2.global_step == 1000 and h2.lambda_ == h.lambda_
    h.global_step = 10**6
    assert h.lambda_ == 5.0
    sphereface_head = ASoftmaxHead(DIM, K, lambda_min=0.0, lambda_schedule="sphereface")
    assert sphereface_head.lambda_at(27999) == pytest.approx(0.2975, rel=1e-3)


def test_registry_and_class_attributes():
    for name, cls in [("asoftmax", ASoftmaxHead), ("sphereface", ASoftmaxHead), ("lsoftmax", LSoftmaxHead),
                      ("cosface", CosFaceHead), ("additive_cosine", CosFaceHead), ("arcface", ArcFaceHead),
                      ("additive_angular", ArcFaceHead), ("normface", NormFaceHead),
                      ("modified_softmax", ModifiedSoftmaxHead)]:
        assert HEADS[name] is cls
        h = build_head(name, 6, 4)
        assert isinstance(h, AngularMarginHead) and h.weight.shape == (4, 6)
        assert cls.needs_labels is True and cls.hyperspherical_layer is True
    h = build_head("asoftmax", 6, 4, m=3)
    assert h.m == 3 and h.bias is None


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    for bad in (0, -2, 2.5):
        with pytest.raises((ValueError, TypeError), match=r"m=.* is not supported; accepted values: an int >= 1"):
            ASoftmaxHead(8, 4, m=bad)
    h = ASoftmaxHead(8, 4)
    with pytest.raises(ValueError, match=r"labels=<class indices in range \[0, 4\]> is not supported; "
                                         r"accepted values: class indices in \[0, 3\]"):
        h(torch.randn(2, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels=<class indices in range .*> is not supported"):
        h(torch.randn(2, 8), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="in_features=8"):
        h(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        h(torch.randn(2, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        h(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="margin_type='bogus'.*accepted values"):
        AngularMarginHead(8, 4, margin_type="bogus")
    with pytest.raises(ValueError, match="weight_norm_mode"):
        ASoftmaxHead(8, 4, weight_norm_mode="nope")
    with pytest.raises(ValueError, match="caffe_normalized"):
        AngularMarginHead(8, 4, normalize_weight=False, gradient_mode="caffe_normalized")
    with pytest.raises(ValueError, match="lambda_schedule"):
        ASoftmaxHead(8, 4, lambda_schedule="fast")
    with pytest.raises(ValueError, match="num_classes"):
        ASoftmaxHead(8, 0)
    with pytest.raises(ValueError, match="feature_scale"):
        CosFaceHead(8, 4, feature_scale=-1.0)
