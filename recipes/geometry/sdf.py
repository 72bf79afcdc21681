"""The signed-distance field of TextMesh's coarse stage, rendered by ``recipes.render.neus``.

Same hash grid and MLPs as the NeRF field, but the first MLP predicts a signed distance (negative
inside). The ``sphere`` bias adds ``‖x‖ − r`` to the network output; the freshly initialised network
outputs almost exactly zero (its hash tables start at ±1e-4), so the field starts as a sphere of radius
``r`` without a separate fitting phase. Normals are the normalised SDF gradient (outward); the gradient
itself feeds the eikonal loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.mlp import MLP, MLPConfig
from recipes.geometry.nerf import FieldOutput, axis_offsets, points_to_unit_cube


@dataclass
class ImplicitSDFConfig:
    """SDF field settings (threestudio ``implicit-sdf`` as configured by TextMesh).

    ``finite_difference_normal_eps="progressive"`` uses half the cell size of the finest level the band
    mask currently enables, shrinking as levels switch on.
    """

    radius: float = 1.0
    n_feature_dims: int = 3
    sdf_bias: Literal["sphere", "none"] = "sphere"
    sphere_radius: float = 0.5
    normal_type: Literal["analytic", "finite_difference"] = "finite_difference"
    finite_difference_normal_eps: float | Literal["progressive"] = "progressive"
    encoding: HashGridConfig = field(
        default_factory=lambda: HashGridConfig(
            per_level_scale=1.381912879967776, start_level=8, start_step=2000, update_steps=500
        )
    )
    mlp: MLPConfig = field(default_factory=MLPConfig)


def sdf_field_output(
    points: Tensor,
    sdf_and_hidden: Callable[[Tensor], tuple[Tensor, Tensor]],
    decode_features: Callable[[Tensor], Tensor],
    normal_type: Literal["analytic", "finite_difference"],
    eps: float,
) -> FieldOutput:
    """An SDF field's output at points ``[N, 3]``: the SDF, its gradient (by autograd, or central differences of
    step ``eps``: 6 more SDF queries a point), unit normals and the features decoded from the hidden values.

    ``sdf_and_hidden(points)`` gives the signed distance ``[N]`` and the hidden values ``[N, H]`` the features are
    decoded from; any SDF field (:class:`ImplicitSDF`, the amortized generators' fields) shares this.
    """
    if normal_type == "analytic":
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            if not points.requires_grad:
                points = points.detach().requires_grad_(True)
            sdf, hidden = sdf_and_hidden(points)
            (gradient,) = torch.autograd.grad(sdf.sum(), points, create_graph=outer_grad)
        if not outer_grad:
            sdf, hidden, gradient = sdf.detach(), hidden.detach(), gradient.detach()
    else:
        sdf, hidden = sdf_and_hidden(points)
        around = sdf_and_hidden(points[:, None, :] + axis_offsets(eps, points))[0]  # [N, 6]
        gradient = 0.5 * (around[:, 0::2] - around[:, 1::2]) / eps
    return FieldOutput(
        features=decode_features(hidden),
        sdf=sdf,
        sdf_gradient=gradient,
        normal=nn.functional.normalize(gradient, dim=-1),
    )


def eikonal_loss(sdf_gradient: Tensor) -> Tensor:
    """Mean of ``(‖∇sdf‖ − 1)²`` over the given gradients ``[N, 3]``."""
    return (sdf_gradient.norm(dim=-1) - 1.0).square().mean()


class ImplicitSDF(nn.Module):
    """Hash grid + MLPs → signed distance, its gradient and features inside ``[-radius, radius]^3``."""

    def __init__(self, config: ImplicitSDFConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else ImplicitSDFConfig()
        self.encoding = HashGridEncoding(config.encoding)
        self.sdf_network = MLP(self.encoding.n_output_dims, 1, config.mlp)
        self.feature_network = MLP(self.encoding.n_output_dims, config.n_feature_dims, config.mlp)
        self._step = 0

    @property
    def radius(self) -> float:
        return self.config.radius

    def update_step(self, step: int) -> None:
        """Apply the band mask (and with it the progressive finite-difference step) for ``step``."""
        self._step = step
        self.encoding.update_step(step)

    def finite_difference_eps(self) -> float:
        """The central-difference step currently in use."""
        eps = self.config.finite_difference_normal_eps
        if eps != "progressive":
            return float(eps)
        levels = self.config.encoding.enabled_levels(self._step)
        finest = self.encoding.resolutions[levels - 1]
        return 0.5 * 2.0 * self.radius / finest

    def sdf_bias(self, points: Tensor) -> Tensor:
        if self.config.sdf_bias == "sphere":
            return points.norm(dim=-1) - self.config.sphere_radius
        if self.config.sdf_bias == "none":
            return torch.zeros_like(points[..., 0])
        raise ValueError(f"unknown sdf_bias {self.config.sdf_bias!r}")

    def _sdf_and_encoding(self, points: Tensor) -> tuple[Tensor, Tensor]:
        encoded = self.encoding(points_to_unit_cube(points, self.radius))
        return self.sdf_network(encoded)[..., 0] + self.sdf_bias(points), encoded

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance ``[...]`` at points ``[..., 3]``."""
        return self._sdf_and_encoding(points)[0]

    def forward(self, points: Tensor, with_normal: bool = True) -> FieldOutput:
        """SDF, its gradient, unit normals and features at points ``[N, 3]`` (the gradient is always computed)."""
        return sdf_field_output(
            points,
            self._sdf_and_encoding,
            self.feature_network,
            self.config.normal_type,
            self.finite_difference_eps(),
        )
