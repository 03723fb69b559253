"""Stateless tensor math (no Lightning imports). Every function is float64-testable."""
from lightning_hyper.functional.energy import hyperspherical_energy, pairwise_angles, output_energy_from_labels
from lightning_hyper.functional.neurons import as_neurons
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

__all__ = [
    "as_neurons",
    "hyperspherical_energy",
    "output_energy_from_labels",
    "pairwise_angles",
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
