"""The regularizers of DreamFusion, Magic3D, TextMesh and ProlificDreamer, as threestudio defines them.

Each loss is a pure function of the renderer's outputs (a mapping with threestudio's keys, as
:class:`~recipes.render.volume.VolumeRenderer` returns them). :class:`RegularizerWeights` holds one weight
per loss, a number or a threestudio schedule ``[start_step, start_value, end_value, end_step]``, and
:func:`regularization` returns the weighted terms at a step, computing only those whose weight is not 0
there.

| loss | formula | needs |
|---|---|---|
| ``orient`` | Σ w.detach()·max(0, n·d)² / #(opacity > 0) | ``weights``, ``normal``, ``t_dirs``, ``opacity`` |
| ``sparsity`` | mean √(opacity² + 0.01) | ``opacity`` |
| ``opaque`` | mean −o·log o − (1 − o)·log(1 − o), o = opacity clamped to [1e-3, 1 − 1e-3] | ``opacity`` |
| ``z_variance`` | mean z_variance over pixels with opacity > 0.5 (HiFA) | ``z_variance``, ``opacity`` |
| ``eikonal`` | mean (‖∇sdf‖ − 1)² | ``sdf_gradient`` |
| ``normal_consistency`` | mean 1 − cos(n_i, n_j) over mesh edges | ``mesh`` |
| ``laplacian_smoothness`` | mean ‖uniform Laplacian‖ of the mesh vertices | ``mesh`` |

DreamGaussian's stage 1 has no regularizer (SDS only; image-to-3D adds the reference-view losses of
:mod:`recipes.guidance.reference_view`). For 3D Gaussians pass ``{"opacity": render.alpha}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from recipes.geometry import mesh as mesh_ops
from recipes.geometry import sdf as sdf_ops
from recipes.guidance.schedules import ScalarSchedule, scalar_at


def _need(outputs: Mapping[str, Any], loss: str, keys: tuple[str, ...], hint: str) -> list[Any]:
    missing = [key for key in keys if key not in outputs]
    if missing:
        raise KeyError(
            f"the {loss} loss needs {', '.join(map(repr, missing))} in the renderer outputs, which has "
            f"{sorted(outputs)}; {hint}, or set its weight to 0"
        )
    return [outputs[key] for key in keys]


def orientation_loss(outputs: Mapping[str, Any]) -> Tensor:
    """DreamFusion's orientation loss: normals facing away from the camera, weighted by the (detached)
    compositing weights, ``Σ w·max(0, n·d)² / #(opacity > 0)`` (the count is at least 1).

    ``d`` is the ray direction (``t_dirs``, camera → point), so a visible surface whose normal points
    away from the camera is penalised.
    """
    weights, normal, t_dirs, opacity = _need(
        outputs,
        "orientation",
        ("weights", "normal", "t_dirs", "opacity"),
        "use a geometry with normal_type analytic or finite_difference and a material that needs normals "
        "(or VolumeRendererConfig.output_normal: true)",
    )
    facing_away = (normal * t_dirs).sum(-1).clamp_min(0.0).square()
    covered = (opacity > 0).sum().clamp_min(1)
    return (weights.detach().reshape(facing_away.shape) * facing_away).sum() / covered


def sparsity_loss(outputs: Mapping[str, Any]) -> Tensor:
    """``mean √(opacity² + 0.01)``: a smooth L1 penalty on the accumulated opacity."""
    (opacity,) = _need(outputs, "sparsity", ("opacity",), "render with a volume or splat renderer")
    return (opacity.square() + 0.01).sqrt().mean()


def opaque_loss(outputs: Mapping[str, Any]) -> Tensor:
    """Binary entropy of the opacity clamped to [1e-3, 1 − 1e-3] (threestudio's
    ``binary_cross_entropy(o, o)``): pushes every pixel to fully opaque or fully transparent."""
    (opacity,) = _need(outputs, "opaque", ("opacity",), "render with a volume or splat renderer")
    o = opacity.clamp(1.0e-3, 1.0 - 1.0e-3)
    return -(o * o.log() + (1.0 - o) * (1.0 - o).log()).mean()


def z_variance_loss(outputs: Mapping[str, Any]) -> Tensor:
    """HiFA's depth variance along the ray, averaged over pixels with opacity > 0.5 (0 when none is)."""
    z_variance, opacity = _need(
        outputs, "z-variance", ("z_variance", "opacity"), "render with the volume renderer"
    )
    solid = (opacity > 0.5).to(z_variance.dtype)  # a mask product: no host sync on the GPU
    return (z_variance * solid).sum() / solid.sum().clamp_min(1.0)


def eikonal_loss(outputs: Mapping[str, Any]) -> Tensor:
    """``mean (‖∇sdf‖ − 1)²`` over the queried samples (TextMesh, NeuS)."""
    (gradient,) = _need(outputs, "eikonal", ("sdf_gradient",), "render an SDF with the NeuS renderer")
    return sdf_ops.eikonal_loss(gradient)


def normal_consistency_loss(outputs: Mapping[str, Any]) -> Tensor:
    """Mean ``1 − cos`` of the vertex normals across the edges of ``outputs["mesh"]`` (Magic3D refine)."""
    (mesh,) = _need(outputs, "normal consistency", ("mesh",), "render a mesh (DMTet) geometry")
    return mesh_ops.normal_consistency_loss(mesh)


def laplacian_smoothness_loss(outputs: Mapping[str, Any]) -> Tensor:
    """Mean norm of the uniform Laplacian of ``outputs["mesh"]`` (ProlificDreamer's geometry stage)."""
    (mesh,) = _need(outputs, "Laplacian smoothness", ("mesh",), "render a mesh (DMTet) geometry")
    return mesh_ops.laplacian_loss(mesh)


REGULARIZERS: dict[str, Callable[[Mapping[str, Any]], Tensor]] = {
    "orient": orientation_loss,
    "sparsity": sparsity_loss,
    "opaque": opaque_loss,
    "z_variance": z_variance_loss,
    "eikonal": eikonal_loss,
    "normal_consistency": normal_consistency_loss,
    "laplacian_smoothness": laplacian_smoothness_loss,
}
"""Loss functions by the name of their weight in :class:`RegularizerWeights`."""


@dataclass
class RegularizerWeights:
    """The weight (threestudio's ``lambda_*``) of each regularizer: a number or a schedule
    ``[start_step, start_value, end_value, end_step]`` of the global step. Default is 0 for every term.

    threestudio's values: DreamFusion and Magic3D coarse ``orient=[0, 10, 1000, 5000]``, ``sparsity=1``;
    TextMesh ``eikonal=1000``; ProlificDreamer stage 1 ``sparsity=10``, ``opaque=[10000, 0, 1000, 10001]``;
    Magic3D refine ``normal_consistency=10000``; ProlificDreamer geometry ``normal_consistency=10000``,
    ``laplacian_smoothness=10000``; Zero-1-to-3 ``orient=1``, ``sparsity=0.1``, ``opaque=0.1``.
    """

    orient: ScalarSchedule = 0.0
    sparsity: ScalarSchedule = 0.0
    opaque: ScalarSchedule = 0.0
    z_variance: ScalarSchedule = 0.0
    eikonal: ScalarSchedule = 0.0
    normal_consistency: ScalarSchedule = 0.0
    laplacian_smoothness: ScalarSchedule = 0.0

    def __post_init__(self) -> None:
        for item in fields(self):
            try:
                scalar_at(getattr(self, item.name), 0)
            except (TypeError, ValueError) as error:
                raise ValueError(f"regularizer weight {item.name!r}: {error}") from error

    def at(self, step: int) -> dict[str, float]:
        """Every weight's value at ``step``, by name."""
        return {item.name: scalar_at(getattr(self, item.name), step) for item in fields(self)}


def regularization(outputs: Mapping[str, Any], weights: RegularizerWeights, step: int) -> dict[str, Tensor]:
    """The weighted regularizers at ``step``: ``{"loss_<name>": weight·loss}`` for every term whose
    weight is not 0 at ``step`` (the others are neither computed nor returned, so their renderer
    outputs need not exist). Sum the values for the total."""
    return {
        f"loss_{name}": weight * REGULARIZERS[name](outputs)
        for name, weight in weights.at(step).items()
        if weight != 0.0
    }
