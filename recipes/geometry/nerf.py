"""The NeRF density field of DreamFusion, Magic3D (coarse), ProlificDreamer (stage 1) and ASD.

Points inside the box ``[-radius, radius]^3`` go through a hash-grid encoding and two small MLPs: one
for the pre-activation density, one for the material features. A density blob centred at the origin
is added before the activation so that optimisation starts from a soft ball instead of empty space.
Normals are the negated, normalised density gradient, analytic (autograd) or by central finite
differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.mesh import TriangleMesh
from recipes.geometry.mlp import MLP, MLPConfig


@dataclass
class FieldOutput:
    """What a field returns at ``N`` points; the renderer reads ``density`` (NeRF) or ``sdf`` (NeuS)."""

    features: Tensor  # [N, n_feature_dims], before the material's activation
    density: Tensor | None = None  # [N], activated, >= 0
    sdf: Tensor | None = None  # [N]
    sdf_gradient: Tensor | None = None  # [N, 3], for the eikonal loss
    normal: Tensor | None = None  # [N, 3], unit length, outward


class _TruncatedExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """``exp(x)`` whose gradient saturates at ``exp(15)`` (Instant-NGP's density activation)."""
    return _TruncatedExp.apply(x)


DENSITY_ACTIVATIONS = {
    "softplus": nn.functional.softplus,
    "exp": torch.exp,
    "trunc_exp": trunc_exp,
    "relu": torch.relu,
}


def points_to_unit_cube(points: Tensor, radius: float) -> Tensor:
    """Map the box ``[-radius, radius]^3`` onto ``[0, 1]^3`` (the encoding's domain)."""
    return (points + radius) / (2.0 * radius)


def axis_offsets(eps: float, like: Tensor) -> Tensor:
    """The six central-difference offsets ``±eps·e_i`` as ``[6, 3]``, ordered +x, −x, +y, −y, +z, −z."""
    eye = torch.eye(3, dtype=like.dtype, device=like.device)
    return torch.stack([eye, -eye], dim=1).reshape(6, 3) * eps


@dataclass
class ImplicitVolumeConfig:
    """NeRF field settings (threestudio ``implicit-volume`` names and defaults)."""

    radius: float = 1.0
    n_feature_dims: int = 3
    density_activation: Literal["softplus", "exp", "trunc_exp", "relu"] = "softplus"
    density_bias: Literal["blob_magic3d", "blob_dreamfusion", "none"] = "blob_magic3d"
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.5
    normal_type: Literal["analytic", "finite_difference", "none"] = "finite_difference"
    finite_difference_normal_eps: float = 0.01
    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)


class ImplicitVolume(nn.Module):
    """Hash grid + MLPs → density and features at world points inside ``[-radius, radius]^3``."""

    def __init__(self, config: ImplicitVolumeConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else ImplicitVolumeConfig()
        self.encoding = HashGridEncoding(config.encoding)
        self.density_network = MLP(self.encoding.n_output_dims, 1, config.mlp)
        self.feature_network = MLP(self.encoding.n_output_dims, config.n_feature_dims, config.mlp)

    @property
    def radius(self) -> float:
        return self.config.radius

    def update_step(self, step: int) -> None:
        """Apply the step-dependent schedules (the hash grid's band mask)."""
        self.encoding.update_step(step)

    def density_bias(self, points: Tensor) -> Tensor:
        """The pre-activation blob added at every point, ``[N]``."""
        cfg = self.config
        if cfg.density_bias == "blob_magic3d":
            return cfg.density_blob_scale * (1.0 - points.norm(dim=-1) / cfg.density_blob_std)
        if cfg.density_bias == "blob_dreamfusion":
            return cfg.density_blob_scale * torch.exp(
                -0.5 * points.square().sum(-1) / cfg.density_blob_std**2
            )
        if cfg.density_bias == "none":
            return torch.zeros_like(points[..., 0])
        raise ValueError(f"unknown density_bias {cfg.density_bias!r}")

    def _density_and_encoding(self, points: Tensor) -> tuple[Tensor, Tensor]:
        encoded = self.encoding(points_to_unit_cube(points, self.radius))
        raw = self.density_network(encoded)[..., 0] + self.density_bias(points)
        return DENSITY_ACTIVATIONS[self.config.density_activation](raw), encoded

    def density(self, points: Tensor) -> Tensor:
        """Activated density ``[...]`` at points ``[..., 3]`` (used by the occupancy grid)."""
        return self._density_and_encoding(points)[0]

    def isosurface(self, resolution: int = 128, threshold: float | Literal["auto"] = "auto") -> TriangleMesh:
        """The mesh of ``density = threshold`` by marching cubes over the box (``"auto"``: the mean grid
        density above 1e-5, threestudio's rule; see :func:`recipes.export.mesh.auto_density_threshold`)."""
        from recipes.export.mesh import nerf_mesh

        return nerf_mesh(self, resolution, threshold)

    def forward(self, points: Tensor, with_normal: bool = False) -> FieldOutput:
        """Density, features and (if asked and ``normal_type`` allows) outward normals at points ``[N, 3]``."""
        normal_type = self.config.normal_type if with_normal else "none"
        if normal_type == "analytic":
            outer_grad = torch.is_grad_enabled()
            with torch.enable_grad():
                if not points.requires_grad:
                    points = points.detach().requires_grad_(True)
                density, encoded = self._density_and_encoding(points)
                (gradient,) = torch.autograd.grad(density.sum(), points, create_graph=outer_grad)
            if not outer_grad:
                density, encoded, gradient = density.detach(), encoded.detach(), gradient.detach()
            normal = nn.functional.normalize(-gradient, dim=-1)
        else:
            density, encoded = self._density_and_encoding(points)
            normal = None
            if normal_type == "finite_difference":
                offsets = axis_offsets(self.config.finite_difference_normal_eps, points)
                shifted = (points[:, None, :] + offsets).clamp(-self.radius, self.radius)
                around = self.density(shifted)  # [N, 6]
                gradient = (
                    0.5 * (around[:, 0::2] - around[:, 1::2]) / self.config.finite_difference_normal_eps
                )
                normal = nn.functional.normalize(-gradient, dim=-1)
        return FieldOutput(features=self.feature_network(encoded), density=density, normal=normal)
