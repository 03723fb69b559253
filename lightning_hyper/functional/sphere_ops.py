"""Old path of the SphereNet / DCNet math, kept so that existing imports keep working (no definitions here).

The operator core is :mod:`lightning_hyper.functional.operators`, the GA-Softmax target
:func:`~lightning_hyper.functional.margin.ga_psi` lives in :mod:`lightning_hyper.functional.margin` and the kernel
orthogonality penalty :func:`~lightning_hyper.functional.orthogonal.kernel_orthogonality` in
:mod:`lightning_hyper.functional.orthogonal`; ``check_choice`` is
:func:`lightning_hyper.functional.checks.check_choice`.
"""
from lightning_hyper.functional.checks import check_choice
from lightning_hyper.functional.margin import PSI_MODES, ga_psi
from lightning_hyper.functional import operators
from lightning_hyper.functional.operators import *  # noqa: F403
from lightning_hyper.functional.orthogonal import ORTHOGONALITY_FORMS, kernel_orthogonality

__all__ = [*operators.__all__, "PSI_MODES", "ga_psi", "check_choice", "ORTHOGONALITY_FORMS", "kernel_orthogonality"]
