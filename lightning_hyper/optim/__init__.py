"""Optimizers and optimization loops on the sphere and the orthogonal group (no Lightning imports).

* :mod:`~lightning_hyper.optim.stiefel`: :class:`StiefelCayleySGD` (OGD, thesis §7.3.5) and :func:`attach_ogd`;
* :mod:`~lightning_hyper.optim.refine`: :func:`minimize_energy` (OPT's refinement of ``V``, §7.3.7).
"""
from lightning_hyper.optim.refine import REFINE_OBJECTIVES, minimize_energy
from lightning_hyper.optim.stiefel import StiefelCayleySGD, attach_ogd

__all__ = ["REFINE_OBJECTIVES", "StiefelCayleySGD", "attach_ogd", "minimize_energy"]
