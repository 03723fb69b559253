"""Stateless tensor math (no Lightning imports). Every function is float64-testable."""
from lightning_hyper.functional.energy import (hyperspherical_energy, minimum_energy, output_energy_from_labels,
                                               pairwise_angles)
from lightning_hyper.functional.neurons import as_neurons
from lightning_hyper.functional.safeguards import bound_gradient_norm
from lightning_hyper.functional.projection import (
    adversarial_step,
    angle_bound_probability,
    angle_bounds,
    angle_preservation_loss,
    angle_preserving_step,
    compressive_energy,
    group_energy,
    group_selection,
    project_neurons,
    projected_energies,
    projection_generator,
    projection_seed,
    random_projections,
    unrolled_adversarial_projection,
    unrolled_angle_projection,
)
from lightning_hyper.functional.margin import (
    LAMBDA_PRESETS,
    additive_angular_margin,
    additive_cosine_margin,
    chebyshev_cos_m,
    lambda_schedule,
    margin_index,
    psi,
)
from lightning_hyper.functional.sphere_ops import (
    angle_function,
    angular_activation,
    decoupled_conv,
    decoupled_linear,
    ga_psi,
    kernel_orthogonality,
    magnitude_function,
    patch_norms,
    safe_acos,
    sphere_conv,
    sphere_linear,
)
from lightning_hyper.functional.verification import (
    angular_fisher_score,
    identification_rank1,
    pair_scores,
    tar_at_far,
    verification_accuracy,
)

__all__ = [
    "as_neurons",
    "bound_gradient_norm",
    "hyperspherical_energy",
    "minimum_energy",
    "output_energy_from_labels",
    "pairwise_angles",
    # margin.py / verification.py (SphereFace)
    "LAMBDA_PRESETS",
    "additive_angular_margin",
    "additive_cosine_margin",
    "angular_fisher_score",
    "chebyshev_cos_m",
    "identification_rank1",
    "lambda_schedule",
    "margin_index",
    "pair_scores",
    "psi",
    "tar_at_far",
    "verification_accuracy",
    # sphere_ops.py (SphereNet, DCNet)
    "angle_function",
    "angular_activation",
    "decoupled_conv",
    "decoupled_linear",
    "ga_psi",
    "kernel_orthogonality",
    "magnitude_function",
    "patch_norms",
    "safe_acos",
    "sphere_conv",
    "sphere_linear",
]
__all__ += [  # projection.py (CoMHE)
    "adversarial_step",
    "angle_bound_probability",
    "angle_bounds",
    "angle_preservation_loss",
    "angle_preserving_step",
    "compressive_energy",
    "group_energy",
    "group_selection",
    "project_neurons",
    "projected_energies",
    "projection_generator",
    "projection_seed",
    "random_projections",
    "unrolled_adversarial_projection",
    "unrolled_angle_projection",
]
from lightning_hyper.functional.discrete import (  # discrete.py (DH2L)
    grouped_metric_energy,
    metric_energy,
    metric_energy_from_labels,
    pairwise_metric,
    pairwise_term,
    sign_ste,
)

__all__ += [
    "grouped_metric_energy",
    "metric_energy",
    "metric_energy_from_labels",
    "pairwise_metric",
    "pairwise_term",
    "sign_ste",
]
# orthogonal.py (OPT)
from lightning_hyper.functional.orthogonal import (
    cayley,
    gram_schmidt,
    householder,
    lowdin,
    matrix_exp,
    orthogonality_error,
    orthogonalize,
)

__all__ += ["cayley", "gram_schmidt", "householder", "lowdin", "matrix_exp", "orthogonality_error",
            "orthogonalize"]

from lightning_hyper.functional.distributed import (gather_rows, ring_hyperspherical_energy,  # noqa: E402
                                                    sharded_hyperspherical_energy)

__all__ += ["gather_rows", "ring_hyperspherical_energy", "sharded_hyperspherical_energy"]  # distributed.py (FSDP2)
