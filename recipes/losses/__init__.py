"""Losses a recipe adds to its guidance loss: regularizers on the renderer's outputs, with step schedules."""

from recipes.losses.regularizers import (
    REGULARIZERS,
    RegularizerWeights,
    eikonal_loss,
    laplacian_smoothness_loss,
    normal_consistency_loss,
    opaque_loss,
    orientation_loss,
    regularization,
    sparsity_loss,
    z_variance_loss,
)

__all__ = [
    "REGULARIZERS",
    "RegularizerWeights",
    "eikonal_loss",
    "laplacian_smoothness_loss",
    "normal_consistency_loss",
    "opaque_loss",
    "orientation_loss",
    "regularization",
    "sparsity_loss",
    "z_variance_loss",
]
