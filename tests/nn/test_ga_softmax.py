"""GA-Softmax / W-Softmax heads (SphereNet eq. 3.10-3.11) against float64 references and SphereFace's A-Softmax."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_hyper.nn import ASoftmaxHead, GASoftmaxHead, WSoftmaxHead
from lightning_hyper.nn.registry import HEADS, build_head

D = torch.float64
PI = math.pi


def ref_logits(x, w, g, k=0.3, m=1, labels=None, lam=0.0):
    """Per-sample loop: ||x|| g(theta_j); target ||x|| (lam g + psi)/(1 + lam) with psi written per case."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=D)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            c = float(x[i] @ w[j] / (x[i].norm() * w[j].norm()))
            t = math.acos(max(-1.0, min(1.0, c)))
            gv = {"linear": 1 - 2 * t / PI, "cosine": c,
                  "sigmoid": math.tanh((PI / 2 - t) / (2 * k)) / math.tanh(PI / (4 * k))}[g]
            val = gv
            if labels is not None and j == int(labels[i]):
                q = min(math.floor(m * t / PI), m - 1)
                if g == "linear":
                    psi = 1 - 2 * m * t / PI
                elif g == "cosine":
                    psi = (-1) ** q * math.cos(m * t) - 2 * q
                else:
                    tt = m * t - q * PI
                    psi = math.tanh((PI / 2 - tt) / (2 * k)) / math.tanh(PI / (4 * k)) - 2 * q
                val = (lam * gv + psi) / (1 + lam)
            out[i, j] = float(x[i].norm()) * val
    return out


def test_registered_and_protocol():
    assert HEADS["gasoftmax"] is GASoftmaxHead and HEADS["wsoftmax"] is WSoftmaxHead
    head = build_head("gasoftmax", 5, 3, m=2, g="cosine")
    assert isinstance(head, GASoftmaxHead) and head.weight.shape == (3, 5)
    assert GASoftmaxHead.needs_labels and GASoftmaxHead.hyperspherical_layer and not WSoftmaxHead.needs_labels


@pytest.mark.parametrize("g", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_logits_match_reference(g, m):
    torch.manual_seed(m)
    head = GASoftmaxHead(6, 4, m=m, g=g, k=0.3, acos_eps=1e-12).double()
    x = torch.randn(7, 6, dtype=D) * 3
    y = torch.randint(0, 4, (7,))
    w = head.weight.detach()
    torch.testing.assert_close(head(x), ref_logits(x, w, g, 0.3), atol=1e-8, rtol=0)
    torch.testing.assert_close(head(x, y), ref_logits(x, w, g, 0.3, m, y), atol=1e-8, rtol=0)
    head.lambda_ = 2.5
    torch.testing.assert_close(head(x, y), ref_logits(x, w, g, 0.3, m, y, lam=2.5), atol=1e-8, rtol=0)


def test_m1_is_w_softmax_and_cosine_is_a_softmax():
    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=D)
    y = torch.randint(0, 3, (9,))
    ga = GASoftmaxHead(5, 3, m=1, g="cosine").double()
    ws = WSoftmaxHead(5, 3, g="cosine").double()
    ws.load_state_dict(ga.state_dict())
    torch.testing.assert_close(ga(x, y), ws(x, y))
    torch.testing.assert_close(ws(x, y), ws(x))
    # cosine GA-Softmax with m = 4 is SphereFace's A-Softmax (other engineer's implementation)
    ga4 = GASoftmaxHead(5, 3, m=4, g="cosine").double()
    asm = ASoftmaxHead(5, 3, m=4, lambda_schedule="none").double()
    with torch.no_grad():
        asm.weight.copy_(ga4.weight)
    asm.lambda_ = 0.0
    torch.testing.assert_close(ga4(x, y), asm(x, y), atol=1e-10, rtol=0)
    torch.testing.assert_close(ga4(x), asm(x), atol=1e-10, rtol=0)


def test_margin_makes_the_loss_larger_except_when_aligned():
    torch.manual_seed(0)
    w_head = GASoftmaxHead(4, 3, m=1, acos_eps=1e-13).double()
    ga_head = GASoftmaxHead(4, 3, m=4, acos_eps=1e-13).double()
    ga_head.load_state_dict(w_head.state_dict())
    y = torch.tensor([0, 1, 2])
    aligned = 2.0 * F.normalize(w_head.weight.detach(), dim=1)[y]
    torch.testing.assert_close(F.cross_entropy(ga_head(aligned, y), y), F.cross_entropy(w_head(aligned, y), y),
                               atol=1e-5, rtol=0)
    x = torch.randn(3, 4, dtype=D)
    assert F.cross_entropy(ga_head(x, y), y) > F.cross_entropy(w_head(x, y), y)


def test_s_softmax_scale_and_finite_gradients():
    head = GASoftmaxHead(4, 3, m=4, g="linear", s=30.0).double()
    x = torch.randn(5, 4, dtype=D)
    out = head(x)
    assert out.abs().max() <= 30.0 + 1e-9
    torch.testing.assert_close(head(7 * x), out)
    aligned = F.normalize(head.weight.detach(), dim=1).clone().requires_grad_(True)
    zero = torch.zeros(2, 4, dtype=D, requires_grad=True)
    for g in ("linear", "cosine", "sigmoid"):
        h = GASoftmaxHead(4, 3, m=4, g=g).double()
        with torch.no_grad():
            h.weight.copy_(head.weight)
        loss = F.cross_entropy(h(aligned, torch.arange(3)), torch.arange(3)) + h(zero, torch.tensor([0, 1])).sum()
        loss.backward()
        assert torch.isfinite(aligned.grad).all() and torch.isfinite(zero.grad).all()
        assert torch.isfinite(h.weight.grad).all()


def test_bad_input():
    with pytest.raises(ValueError, match=r"g='tanh'.*accepted values.*linear"):
        GASoftmaxHead(4, 3, g="tanh")
    with pytest.raises(ValueError, match="m must be an integer >= 1"):
        GASoftmaxHead(4, 3, m=0)
    with pytest.raises(ValueError, match="m must be an integer >= 1"):
        GASoftmaxHead(4, 3, m=2.5)
    with pytest.raises(ValueError, match="k must be"):
        GASoftmaxHead(4, 3, g="sigmoid", k=0)
    with pytest.raises(ValueError, match="psi_mode"):
        GASoftmaxHead(4, 3, psi_mode="mono")
    with pytest.raises(ValueError, match="margin_lambda"):
        GASoftmaxHead(4, 3, margin_lambda=-1)
    head = GASoftmaxHead(4, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="no margin"):
        WSoftmaxHead(4, 3, m=4)
