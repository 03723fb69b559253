import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv
from torch_geometric.nn.dense.linear import Linear as PygLinear

from lightning_hyper.functional import as_neurons, hyperspherical_energy
from lightning_hyper.functional.neurons import has_neurons


def test_linear_rows_are_neurons():
    layer = nn.Linear(5, 3)
    assert torch.equal(as_neurons(layer), layer.weight)
    assert torch.equal(as_neurons(layer.weight), layer.weight)


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d(4, 6, 3), (6, 12)), (nn.Conv2d(4, 6, 3), (6, 36)),
                                        (nn.Conv3d(2, 6, 2), (6, 16)), (nn.Conv2d(4, 6, 3, groups=2), (6, 18))])
def test_conv_filters_are_neurons(conv, shape):
    n = as_neurons(conv)
    assert n.shape == shape
    for i in range(shape[0]):  # row i is filter i, flattened
        assert torch.equal(n[i], conv.weight[i].flatten())


def test_transposed_conv_output_channels_are_neurons():
    conv = nn.ConvTranspose2d(3, 5, 2)  # weight (in=3, out=5, 2, 2)
    n = as_neurons(conv)
    assert n.shape == (5, 12)
    for o in range(5):
        assert torch.equal(n[o], conv.weight[:, o].flatten())
    grouped = nn.ConvTranspose2d(4, 6, 2, groups=2)  # weight (4, 3, 2, 2)
    g = as_neurons(grouped)
    assert g.shape == (6, 8)
    assert torch.equal(g[4], grouped.weight[2:4, 1].flatten())  # group 1, its output channel 1


def test_torch_geometric_linear():
    conv = GCNConv(7, 4)
    assert has_neurons(conv.lin)
    assert torch.equal(as_neurons(conv.lin), conv.lin.weight)
    lazy = PygLinear(-1, 4)
    with pytest.raises(ValueError, match="lazy"):
        as_neurons(lazy)
    lazy(torch.randn(2, 3))
    assert as_neurons(lazy).shape == (4, 3)


def test_gradients_flow_to_the_weight():
    conv = nn.Conv2d(3, 8, 3)
    hyperspherical_energy(as_neurons(conv)).backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="weight.*1-D"):
        as_neurons(torch.randn(5))
    with pytest.raises(TypeError, match="weight"):
        as_neurons([1.0, 2.0])
    with pytest.raises(TypeError, match="weight"):
        as_neurons(nn.ReLU())
    assert not has_neurons(nn.BatchNorm2d(3))
