"""SphereNet layers (thesis Ch. 3, "Deep Hyperspherical Learning"): SphereConv1d/2d/3d, SphereLinear, SphereNorm.

Each layer is a subclass of the matching ``torch.nn`` layer (same ``weight`` / ``bias`` and
``state_dict`` keys, so ``isinstance`` checks, energy callbacks and weight copying keep working);
only ``forward`` changes: the output is ``g(theta(w, x)) (+ b)``, ``theta`` the angle between each
filter and each input patch, ``g`` chosen by ``angle_fn``:

* ``"linear"``: ``1 - 2 theta / pi`` (eq. 3.2);
* ``"cosine"``: ``cos theta`` (eq. 3.3, the cheapest, no arccos);
* ``"sigmoid"``: ``tanh((pi/2 - theta)/(2k)) / tanh(pi/(4k))`` with curvature ``k`` (eq. 3.4, default 0.3);
* ``"learnable"``: sigmoid with a trained ``k = |k_raw| + k_min`` (§3.2.2, init 0.5, one per filter);
* ``"none"``: the plain convolution (baseline).

Outputs lie in ``[-1, 1]`` (before the optional bias / affine rescale). See
:mod:`lightning_hyper.functional.operators` for the math.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.operators import ANGLE_FNS, sphere_conv, sphere_linear

__all__ = [
    "SphereMixin",
    "K_SHARING",
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "SphereNorm",
    "make_shared_k",
]

#: How the learnable curvature k is shared (spherenet spec §2).
K_SHARING: tuple[str, ...] = ("per_filter", "per_layer", "per_network")
_DEFAULT_K = {"sigmoid": 0.3, "learnable": 0.5}


def make_shared_k(k: float = 0.5, k_min: float = 0.05) -> nn.Parameter:
    """One learnable curvature for a whole network (``k_sharing="per_network"``): pass the returned
    parameter as ``shared_k`` to every layer. Stored raw: ``k = |k_raw| + k_min``."""
    check_number("k", k, low=k_min)
    return nn.Parameter(torch.tensor([k - k_min]))


class SphereMixin:
    """Shared construction/forward of the Sphere layers (mixed into an ``nn.Conv*d`` / ``nn.Linear``)."""

    angle_fn: str
    hyperspherical_layer = True

    def _setup_sphere(
        self,
        out_features: int,
        angle_fn: str,
        k: float | None,
        k_sharing: str,
        shared_k: nn.Parameter | None,
        k_min: float,
        eps: float,
        acos_eps: float,
        affine: bool,
        affine_learnable: bool,
        affine_init: tuple[float, float],
    ) -> None:
        self.angle_fn = check_choice("angle_fn", angle_fn, ANGLE_FNS)
        self.k_sharing = check_choice("k_sharing", k_sharing, K_SHARING)
        check_number("eps", eps, low=0.0, low_inclusive=True)
        check_number("acos_eps", acos_eps, low=0.0, high=1.0, high_inclusive=False)
        self.eps = float(eps)
        self.acos_eps = float(acos_eps)
        self.k_min = check_number("k_min", k_min, low=0.0) if angle_fn == "learnable" else float(k_min)
        self.k_value: float | None = None
        if angle_fn == "sigmoid":
            self.k_value = check_number("k", _DEFAULT_K["sigmoid"] if k is None else k, low=0.0)
        elif angle_fn == "learnable":
            if shared_k is not None:
                if not isinstance(shared_k, nn.Parameter):
                    raise TypeError(f"shared_k must be an nn.Parameter (see make_shared_k), got {type(shared_k)}")
                self.k_sharing = "per_network"
                self.k_raw = shared_k
            else:
                if k_sharing == "per_network":
                    raise ValueError("k_sharing='per_network' needs shared_k=make_shared_k(...) passed to every layer")
                k0 = check_number("k", _DEFAULT_K["learnable"] if k is None else k, low=self.k_min)
                n = out_features if k_sharing == "per_filter" else 1
                self.k_raw = nn.Parameter(torch.full((n,), k0 - self.k_min))
        elif k is not None:
            raise ValueError(f"k is only used with angle_fn in ['sigmoid', 'learnable'], got angle_fn={angle_fn!r}")
        self.affine = bool(affine)
        if affine:
            scale = torch.full((out_features,), float(affine_init[0]))
            shift = torch.full((out_features,), float(affine_init[1]))
            if affine_learnable:
                self.affine_scale = nn.Parameter(scale)
                self.affine_shift = nn.Parameter(shift)
            else:
                self.register_buffer("affine_scale", scale)
                self.register_buffer("affine_shift", shift)

    @property
    def k(self) -> Tensor | float | None:
        """The curvature in use: a float (``sigmoid``), a tensor ``|k_raw| + k_min`` (``learnable``) or None."""
        if self.angle_fn == "learnable":
            return self.k_raw.abs() + self.k_min
        return self.k_value

    def _affine(self, out: Tensor, channel_dim: int) -> Tensor:
        if not self.affine:
            return out
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        return out * self.affine_scale.view(shape) + self.affine_shift.view(shape)

    def _sphere_extra_repr(self) -> str:
        s = f", angle_fn={self.angle_fn!r}"
        if self.angle_fn == "sigmoid":
            s += f", k={self.k_value}"
        if self.angle_fn == "learnable":
            s += f", k_sharing={self.k_sharing!r}"
        if self.affine:
            s += ", affine=True"
        return s


_SphereMixin = SphereMixin  # the name callbacks imported before it was public


class _SphereConvNd(SphereMixin):
    def _conv_input(self, x: Tensor) -> tuple[Tensor, Any]:
        if self.padding_mode != "zeros":  # pad once explicitly so both convolutions see the same patches
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def forward(self, x: Tensor) -> Tensor:
        x, padding = self._conv_input(x)
        out = sphere_conv(
            x, self.weight, None, self.stride, padding, self.dilation, self.groups,
            self.angle_fn, self.k, self.eps, self.acos_eps,
        )
        out = self._affine(out, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_extra_repr()


_SPHERE_DOC = """
    Args (beyond those of ``nn.{base}``; note ``bias`` defaults to False, a BN layer follows):
        angle_fn: ``"linear" | "cosine" | "sigmoid" | "learnable" | "none"``.
        k: sigmoid curvature (default 0.3) or initial learnable k (default 0.5); must be > 0
            (> ``k_min`` for learnable).
        k_sharing: learnable k ``"per_filter"`` (one per output channel), ``"per_layer"`` or
            ``"per_network"`` (then pass ``shared_k=make_shared_k()`` to every layer).
        k_min: lower bound of the learnable k (``k = |k_raw| + k_min``).
        eps: added inside both norms' square roots (all-zero patches give output 0, no NaN).
        acos_eps: arccos clamp ``[-1+acos_eps, 1-acos_eps]`` (gradient capped, never infinite).
        affine: SphereNorm rescale ``scale * F_s + shift`` per output channel (§3.3), learned if
            ``affine_learnable`` else fixed buffers; initialized to ``affine_init = (scale, shift)``.
"""


class SphereConv1d(_SphereConvNd, nn.Conv1d):
    __doc__ = "1-D SphereConv: ``g(theta(w, x))`` per filter and patch (thesis eq. 3.1)." + _SPHERE_DOC.format(
        base="Conv1d"
    )

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, angle_fn: str = "cosine", k: float | None = None, k_sharing: str = "per_filter",
        shared_k: nn.Parameter | None = None, k_min: float = 0.05, eps: float = 1e-4, acos_eps: float = 1e-6,
        affine: bool = False, affine_learnable: bool = True, affine_init: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        nn.Conv1d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_sphere(
            out_channels, angle_fn, k, k_sharing, shared_k, k_min, eps, acos_eps, affine, affine_learnable, affine_init
        )


class SphereConv2d(_SphereConvNd, nn.Conv2d):
    __doc__ = "2-D SphereConv: ``g(theta(w, x))`` per filter and patch (thesis eq. 3.1)." + _SPHERE_DOC.format(
        base="Conv2d"
    )

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, angle_fn: str = "cosine", k: float | None = None, k_sharing: str = "per_filter",
        shared_k: nn.Parameter | None = None, k_min: float = 0.05, eps: float = 1e-4, acos_eps: float = 1e-6,
        affine: bool = False, affine_learnable: bool = True, affine_init: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_sphere(
            out_channels, angle_fn, k, k_sharing, shared_k, k_min, eps, acos_eps, affine, affine_learnable, affine_init
        )


class SphereConv3d(_SphereConvNd, nn.Conv3d):
    __doc__ = "3-D SphereConv: ``g(theta(w, x))`` per filter and patch (thesis eq. 3.1)." + _SPHERE_DOC.format(
        base="Conv3d"
    )

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, angle_fn: str = "cosine", k: float | None = None, k_sharing: str = "per_filter",
        shared_k: nn.Parameter | None = None, k_min: float = 0.05, eps: float = 1e-4, acos_eps: float = 1e-6,
        affine: bool = False, affine_learnable: bool = True, affine_init: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        nn.Conv3d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_sphere(
            out_channels, angle_fn, k, k_sharing, shared_k, k_min, eps, acos_eps, affine, affine_learnable, affine_init
        )


class SphereLinear(SphereMixin, nn.Linear):
    __doc__ = (
        "SphereLinear: ``g(theta(W_i, x))`` with ``cos theta = x.W_i / (||x|| ||W_i||)`` -- the SphereConv whose "
        "kernel covers the whole input (spherenet spec §1.3); input ``(..., in_features)``."
        + _SPHERE_DOC.format(base="Linear")
    )

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: Any = None, dtype: Any = None, *,
        angle_fn: str = "cosine", k: float | None = None, k_sharing: str = "per_filter",
        shared_k: nn.Parameter | None = None, k_min: float = 0.05, eps: float = 1e-4, acos_eps: float = 1e-6,
        affine: bool = False, affine_learnable: bool = True, affine_init: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup_sphere(
            out_features, angle_fn, k, k_sharing, shared_k, k_min, eps, acos_eps, affine, affine_learnable, affine_init
        )

    def forward(self, x: Tensor) -> Tensor:
        out = sphere_linear(x, self.weight, None, self.angle_fn, self.k, self.eps, self.acos_eps)
        out = self._affine(out, -1)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_extra_repr()


class SphereNorm(SphereConv2d):
    """SphereNorm (thesis §3.3): the cosine SphereConv used as a normalization layer.

    Its output ``cos theta`` is bounded in ``[-1, 1]`` and uses only the patch and the filter, never
    batch statistics (batch-size independent). Optional per-channel rescale ``scale * F_s + shift``
    (``affine=True``; the thesis found it "does not seem to work well", so off by default). Same
    arguments as :class:`SphereConv2d` with ``angle_fn="cosine"`` by default; use it with or without
    a following BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, *args: Any, angle_fn: str = "cosine",
                 affine: bool = False, **kwargs: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, angle_fn=angle_fn, affine=affine, **kwargs)


SphereOperator = _SphereMixin  # public name of the base of every Sphere* layer (for isinstance checks, e.g. callbacks)
