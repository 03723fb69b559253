"""Graph convolutional network (Kipf & Welling, ICLR'17) on torch-geometric ``GCNConv``.

``Z = Â · ReLU(Â X W₀) · W₁`` with ``Â = D̃^{-1/2}(A + I)D̃^{-1/2}`` (thesis §7.4.5, spec §7.6 — the thesis
prints ``D̃^{1/2}``, a typo). Each ``GCNConv`` keeps its weight in ``conv.lin``, a
``torch_geometric.nn.dense.linear.Linear`` (Glorot init, no bias; the bias sits on the conv), so
hyperspherical callbacks and :func:`~lightning_hyper.nn.opt.apply_opt` see ordinary neuron layers.
The last conv's ``lin`` is the classifier (``output_layer_name``); OPT is applied to ``W₀`` only.
Dropout on the input of every conv, as in the reference implementation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GCN"]


class GCN(nn.Module):
    """Stack of ``num_layers`` ``GCNConv`` layers with ReLU and dropout in between.

    Args:
        in_channels: node feature size.
        hidden_channels: width of the hidden layers (16 in Kipf & Welling).
        out_channels: output size of the last conv (the number of classes); ``None`` ends with a
            hidden-size layer (then ``out_features = hidden_channels``).
        num_layers: number of convs (>= 1).
        dropout: dropout probability on the input of every conv.
        cached, add_self_loops, normalize: passed to ``GCNConv``.
        learn_scale: indices of convs whose output is multiplied by a learned scale (initialized to 1;
            ``GraphClassifier`` puts one on every OPT conv, whose neuron norms OPT keeps fixed).
        channel_scale: ``learn_scale`` holds one scale per output channel (BN's γ) instead of one scalar.

    ``forward(x, edge_index, edge_weight=None) -> (num_nodes, out_features)``.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 16, out_channels: int | None = None,
                 num_layers: int = 2, dropout: float = 0.5, cached: bool = False, add_self_loops: bool = True,
                 normalize: bool = True, learn_scale: Sequence[int] = (),
                 channel_scale: bool = False) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if out_channels is not None and (not isinstance(out_channels, int) or out_channels < 1):
            raise ValueError(f"out_channels must be None or a positive integer, got {out_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        sizes = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels or hidden_channels]
        self.convs = nn.ModuleList(
            GCNConv(a, b, cached=cached, add_self_loops=add_self_loops, normalize=normalize)
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        learn_scale = sorted(set(learn_scale))
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in learn_scale):
            raise ValueError(f"learn_scale must hold conv indices in [0, {num_layers - 1}], got {learn_scale!r}")
        self.scales = nn.ParameterDict({str(i): nn.Parameter(torch.ones((sizes[i + 1],) if channel_scale else ()))
                                        for i in learn_scale})
        self.dropout = dropout
        self.in_channels = in_channels
        self.out_features = sizes[-1]
        self.output_layer_name = f"convs.{num_layers - 1}.lin"

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"GCN expects node features of shape (num_nodes, {self.in_channels}), "
                             f"got {tuple(x.shape)}")
        for i, conv in enumerate(self.convs):
            x = F.dropout(x, p=self.dropout, training=self.training)
            x = conv(x, edge_index, edge_weight)
            if str(i) in self.scales:
                x = x * self.scales[str(i)]
            if i < len(self.convs) - 1:
                x = torch.relu(x)
        return x
