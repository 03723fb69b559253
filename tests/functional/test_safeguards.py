"""bound_gradient_norm: identity forward; backward caps the gradient's Frobenius norm, keeps its direction."""
from __future__ import annotations

import pytest
import torch

from lightning_hyper.functional.safeguards import bound_gradient_norm

D = torch.float64


@pytest.mark.parametrize("scale,limit", [(100.0, 1.0), (0.01, 1.0), (3.0, 2.5)])
def test_caps_the_norm_and_keeps_the_direction(scale, limit):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=D, requires_grad=True)
    g = scale * torch.randn(5, 3, dtype=D)
    y = bound_gradient_norm(x, limit)
    assert torch.equal(y, x)
    y.backward(g)
    expected = g * min(1.0, limit / float(g.norm()))  # independent: rescale only above the limit
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)
    assert float(x.grad.norm()) <= limit * (1 + 1e-12)


def test_nonfinite_gradients_pass_unchanged_and_double_backward_works():
    x = torch.randn(3, 2, dtype=D, requires_grad=True)
    g = torch.full((3, 2), float("nan"), dtype=D)
    bound_gradient_norm(x, 1.0).backward(g)
    assert torch.isnan(x.grad).all()
    assert torch.autograd.gradcheck(lambda t: (bound_gradient_norm(t, 1e3) ** 2).sum(), (x.detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda t: bound_gradient_norm(t, 1e3) ** 3, (x.detach().requires_grad_(),))


def test_no_grad_input_and_bad_limit():
    x = torch.randn(2, 2)
    assert bound_gradient_norm(x, 1.0) is x
    with pytest.raises(ValueError, match="max_norm=0"):
        bound_gradient_norm(x.requires_grad_(), 0)
