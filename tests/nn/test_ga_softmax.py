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
    with pytest.raises(ValueError, match=r"m=.* is not supported; accepted values: an int >= 1"):
        GASoftmaxHead(4, 3, m=0)
    with pytest.raises(ValueError, match=r"m=.* is not supported; accepted values: an int >= 1"):
        GASoftmaxHead(4, 3, m=2.5)
    with pytest.raises(ValueError, match=r"k=.* is not supported; accepted values: a finite number >"):
        GASoftmaxHead(4, 3, g="sigmoid", k=0)
    with pytest.raises(ValueError, match="psi_mode"):
        GASoftmaxHead(4, 3, psi_mode="mono")
    with pytest.raises(ValueError, match="margin_lambda"):
        GASoftmaxHead(4, 3, margin_lambda=-1)
    head = GASoftmaxHead(4, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"labels=<class indices in range .*> is not supported; "
                                         r"accepted values: class indices in \[0, 2\]"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="no margin"):
        WSoftmaxHead(4, 3, m=4)


# ------------------------------------------------------------------ lambda annealing (App. A.7, SphereFace's schedule)
def test_lambda_schedule_anneals_per_training_step():
    from lightning_hyper.functional.margin import lambda_schedule

    torch.manual_seed(0)
    head = GASoftmaxHead(5, 3, m=4, g="linear", lambda_schedule="sphereface", acos_eps=1e-12).double()
    assert head.global_step == 0 and head.lambda_ == pytest.approx(1000 / 1.12)  # lambda(1) = 892.857
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    for t in range(3):
        lam = lambda_schedule(t + 1)  # the step's own lambda (t = 0-based training step)
        assert head.lambda_at(t) == pytest.approx(lam)
        torch.testing.assert_close(head(x, y), ref_logits(x, head.weight.detach(), "linear", m=4, labels=y, lam=lam),
                                   atol=1e-8, rtol=0)
        assert head.global_step == t + 1
    assert head.lambda_ == pytest.approx(lambda_schedule(4))
    # inference, eval mode and no_grad do not advance the schedule
    head(x)
    head.eval()
    head(x, y)
    head.train()
    with torch.no_grad():
        head(x, y)
    assert head.global_step == 3
    # the training loop may drive it instead; overrides of the preset and the floor lambda_min
    head.auto_step = False
    head.global_step = 10_000
    head(x, y)
    assert head.global_step == 10_000 and head.lambda_ == 5.0
    custom = GASoftmaxHead(5, 3, lambda_schedule="sphereface", lambda_base=100.0, lambda_min=0.0)
    assert custom.lambda_at(9) == pytest.approx(100 / (1 + 0.12 * 10))
    # lambda = inf (a warm start) gives the plain W-Softmax logits
    head.lambda_ = math.inf
    torch.testing.assert_close(head(x, y), head(x))


def test_lambda_step_is_a_buffer_that_survives_state_dict():
    head = GASoftmaxHead(4, 3, m=4, lambda_schedule="pytorch_port")
    head.global_step = 42
    state = head.state_dict()
    assert int(state["lambda_step"]) == 42
    fresh = GASoftmaxHead(4, 3, m=4, lambda_schedule="pytorch_port")
    fresh.load_state_dict(state)
    assert fresh.global_step == 42 and fresh.lambda_ == pytest.approx(max(5.0, 1500 / (1 + 0.1 * 43)))
    fixed = GASoftmaxHead(4, 3, m=4, margin_lambda=2.5)  # no schedule: lambda stays fixed
    fixed.global_step = 100
    assert fixed.lambda_ == 2.5 and fixed.lambda_at(7) == 2.5
    assert "lambda_schedule='pytorch_port'" in repr(fresh) and "margin_lambda=2.5" in repr(fixed)


def test_lambda_schedule_resumes_from_a_lightning_checkpoint(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_hyper.models import HypersphericalClassifier

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=8)

    def model():
        return HypersphericalClassifier(backbone="embedding_mlp", num_classes=3,
                                        backbone_kwargs={"in_features": 6, "hidden": [8], "embedding_dim": 4},
                                        head="gasoftmax", head_kwargs={"m": 4, "lambda_schedule": "sphereface"},
                                        optimizer="adam", lr=1e-2)

    def trainer(steps, **kw):
        return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu", limit_val_batches=0, **kw)

    first = model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(3, callbacks=[ckpt]).fit(first, data)
    assert first.head.global_step == 3
    path = next(tmp_path.glob("*step=3*.ckpt"))
    restored = HypersphericalClassifier.load_from_checkpoint(path)
    assert restored.head.global_step == 3 and restored.head.lambda_ == pytest.approx(first.head.lambda_)
    resumed = model()
    trainer(5, enable_checkpointing=False).fit(resumed, data, ckpt_path=path)
    assert resumed.head.global_step == 5


def test_lambda_schedule_bad_input():
    with pytest.raises(ValueError, match=r"lambda_schedule='fast' is not supported; accepted values: .*'sphereface'"):
        GASoftmaxHead(4, 3, lambda_schedule="fast")
    with pytest.raises(ValueError, match="need lambda_schedule"):
        GASoftmaxHead(4, 3, lambda_min=5.0)
    with pytest.raises(ValueError, match="margin_lambda is the fixed lambda"):
        GASoftmaxHead(4, 3, margin_lambda=1.0, lambda_schedule="sphereface")
