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
    ga_psi,
    lambda_schedule,
    margin_index,
    psi,
)
from lightning_hyper.functional.operators import (
    angle_function,
    angular_activation,
    decoupled_conv,
    decoupled_linear,
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
    # margin.py (every margin: SphereFace, CosFace, ArcFace, GA-Softmax) / verification.py
    "LAMBDA_PRESETS",
    "additive_angular_margin",
    "additive_cosine_margin",
    "angular_fisher_score",
    "chebyshev_cos_m",
    "ga_psi",
    "identification_rank1",
    "lambda_schedule",
    "margin_index",
    "pair_scores",
    "psi",
    "tar_at_far",
    "verification_accuracy",
    # operators.py (SphereNet, DCNet operator core)
    "angle_function",
    "angular_activation",
    "decoupled_conv",
    "decoupled_linear",
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
# orthogonal.py (OPT maps; the one ||W W^T - I|| penalty used by OPT, SphereNet, DCNet and DH2L)
from lightning_hyper.functional.orthogonal import (
    cayley,
    gram_schmidt,
    householder,
    kernel_orthogonality,
    lowdin,
    matrix_exp,
    orthogonality_error,
    orthogonality_penalty,
    orthogonalize,
    relaxed_orthogonality_penalty,
)

__all__ += ["cayley", "gram_schmidt", "householder", "kernel_orthogonality", "lowdin", "matrix_exp",
            "orthogonality_error", "orthogonality_penalty", "orthogonalize", "relaxed_orthogonality_penalty"]
# checks.py / seeding.py (one argument-check message style, one seed derivation)
from lightning_hyper.functional.checks import check_choice, check_fraction, check_number
from lightning_hyper.functional.seeding import derive_seed, seeded_generator

__all__ += ["check_choice", "check_fraction", "check_number", "derive_seed", "seeded_generator"]
# hierarchy.py (DH2L: the label tree and the hierarchical penalty)
from lightning_hyper.functional.hierarchy import Hierarchy, hierarchical_penalty, mean_geometry

__all__ += ["Hierarchy", "hierarchical_penalty", "mean_geometry"]

from lightning_hyper.functional.distributed import (gather_rows, ring_hyperspherical_energy,
                                                    sharded_hyperspherical_energy)

__all__ += ["gather_rows", "ring_hyperspherical_energy", "sharded_hyperspherical_energy"]  # distributed.py (FSDP2)
