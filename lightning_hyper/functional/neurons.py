"""How a layer's weight becomes a set of neurons: an (N, d) matrix whose rows are neurons.

This is the only place in the library that knows weight layouts (MHE spec §1):

* ``nn.Linear`` / torch-geometric ``Linear``: weight ``(out, in)`` -> N = out, d = in.
* ``nn.Conv{1,2,3}d``: weight ``(out, in/groups, *k)`` -> N = out, d = (in/groups)·Πk.
* ``nn.ConvTranspose{1,2,3}d``: weight ``(in, out/groups, *k)`` -> neurons are output channels.
* any module with a 2-D ``weight`` whose rows are classes/neurons (margin heads, OPT layers).

Bias terms are never part of a neuron.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = ["as_neurons", "has_neurons"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _pyg_linear_type() -> type | None:
    try:  # torch-geometric is a dependency, but keep functional/ importable without it
        from torch_geometric.nn.dense.linear import Linear
    except Exception:  # pragma: no cover - exercised only without torch-geometric
        return None
    return Linear


def has_neurons(module: nn.Module) -> bool:
    """True if ``module`` owns a weight whose rows are neurons (see module docstring)."""
    pyg_linear = _pyg_linear_type()
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)):
        return True
    if pyg_linear is not None and isinstance(module, pyg_linear):
        return True
    return bool(getattr(module, "hyperspherical_layer", False))


def as_neurons(weight: Tensor | nn.Module) -> Tensor:
    """Return the neurons of a weight tensor or layer as an ``(N, d)`` matrix (rows = neurons).

    ``weight`` may be a tensor with at least 2 dimensions (dim 0 indexes neurons) or a layer
    (its *effective* ``.weight`` is read, so parametrized layers such as OPT work). Transposed
    convolutions are re-ordered so that output channels are the neurons. The result is a view
    where possible; gradients flow back to the weight.
    """
    if isinstance(weight, nn.Module):
        module = weight
        pyg_linear = _pyg_linear_type()
        w = getattr(module, "weight", None)
        if pyg_linear is not None and isinstance(module, pyg_linear):
            if isinstance(w, nn.parameter.UninitializedParameter):
                raise ValueError(
                    "weight: torch_geometric Linear is still lazy (in_channels=-1); run one forward "
                    "pass before reading its neurons"
                )
        if not isinstance(w, Tensor):
            raise TypeError(f"weight: module {type(module).__name__} has no tensor attribute 'weight'")
        if isinstance(module, _TRANSPOSED):
            groups = module.groups
            if groups == 1:
                return w.transpose(0, 1).reshape(w.shape[1], -1)
            in_ch, out_per_group = w.shape[0], w.shape[1]
            in_per_group = in_ch // groups
            # (groups, in/g, out/g, *k) -> (groups, out/g, in/g, *k) -> (out, in/g * prod k)
            w = w.reshape(groups, in_per_group, out_per_group, *w.shape[2:]).transpose(1, 2)
            return w.reshape(groups * out_per_group, -1)
        return as_neurons(w)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a Tensor or an nn.Module, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"weight: expected a tensor with at least 2 dimensions (neurons, ...), got shape "
            f"{tuple(weight.shape)}; a 1-D tensor (e.g. a bias or a norm scale) has no neurons"
        )
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # explicit d: works for 0 neurons

