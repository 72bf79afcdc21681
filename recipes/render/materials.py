"""Materials: turn a field's features (and normals, light) into RGB at sample points.

Randomness: in training the diffuse material picks one shading mode for the whole batch (and, with
``soft_shading``, a random ambient ratio). It draws from ``generator`` when one is given, otherwise
from the global torch RNG, which the Picard strategy seeds per step. Python ``random`` is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Shading = Literal["albedo", "textureless", "diffuse"]


def albedo_activation(name: str, features: Tensor) -> Tensor:
    """Map raw features to colours in [0, 1]: ``sigmoid`` or ``scale_-11_01`` (clamp((x + 1) / 2, 0, 1))."""
    if name == "sigmoid":
        return torch.sigmoid(features)
    if name == "scale_-11_01":
        return ((features + 1.0) * 0.5).clamp(0.0, 1.0)
    raise ValueError(f"unknown albedo activation {name!r}")


@dataclass
class DiffusePointLightConfig:
    """threestudio ``diffuse-with-point-light-material`` settings (DreamFusion uses ``scale_-11_01``)."""

    ambient_light_color: float = 0.1
    diffuse_light_color: float = 0.9
    ambient_only_steps: int = 1000
    diffuse_prob: float = 0.75
    textureless_prob: float = 0.5
    albedo_activation: Literal["sigmoid", "scale_-11_01"] = "sigmoid"
    soft_shading: bool = False


class DiffusePointLightMaterial(nn.Module):
    """Lambertian albedo lit by an ambient term plus one point light: ``albedo · (a + d · max(n·l, 0))``."""

    requires_normal = True

    def __init__(self, config: DiffusePointLightConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DiffusePointLightConfig()
        self.ambient_only = self.config.ambient_only_steps > 0

    def update_step(self, step: int) -> None:
        """Shade with albedo only until ``ambient_only_steps`` (a pure function of the step)."""
        self.ambient_only = step < self.config.ambient_only_steps

    def sample_shading(self, generator: torch.Generator | None = None) -> tuple[Shading, float | None]:
        """The shading mode (and ambient ratio, with soft shading) for one training batch."""
        cfg = self.config
        draws = torch.rand(3, generator=generator).tolist()
        ambient_ratio = draws[2] if cfg.soft_shading else None
        if self.ambient_only or draws[0] > cfg.diffuse_prob:
            return "albedo", ambient_ratio
        return ("textureless" if draws[1] < cfg.textureless_prob else "diffuse"), ambient_ratio

    def default_shading(self) -> Shading:
        """The mode used outside training: albedo while ambient-only, shaded afterwards."""
        return "albedo" if self.ambient_only else "diffuse"

    def forward(
        self,
        features: Tensor,
        positions: Tensor,
        normal: Tensor | None,
        light_positions: Tensor,
        shading: Shading = "diffuse",
        ambient_ratio: float | None = None,
    ) -> Tensor:
        """RGB ``[..., 3]`` from features ``[..., C]``, positions, unit normals and light positions ``[..., 3]``."""
        albedo = albedo_activation(self.config.albedo_activation, features[..., :3])
        if shading == "albedo":
            return albedo
        if normal is None:
            raise ValueError(f"shading {shading!r} needs normals; the field's normal_type is 'none'")
        if ambient_ratio is None:
            ambient, diffuse = self.config.ambient_light_color, self.config.diffuse_light_color
        else:
            ambient, diffuse = ambient_ratio, 1.0 - ambient_ratio
        light_direction = nn.functional.normalize(light_positions - positions, dim=-1)
        lambert = (normal * light_direction).sum(-1, keepdim=True).clamp(min=0.0)
        textureless = (ambient + diffuse * lambert).expand_as(albedo)
        if shading == "textureless":
            return textureless
        return albedo * textureless.clamp(max=1.0)


@dataclass
class NoMaterialConfig:
    """Features are the colour (ProlificDreamer, ASD): only the activation is configurable."""

    albedo_activation: Literal["sigmoid", "scale_-11_01"] = "sigmoid"


class NoMaterial(nn.Module):
    """Unlit colour: ``activation(features[..., :3])``; ignores normals and lights."""

    requires_normal = False

    def __init__(self, config: NoMaterialConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else NoMaterialConfig()

    def update_step(self, step: int) -> None:
        """No schedule."""

    def sample_shading(self, generator: torch.Generator | None = None) -> tuple[Shading, float | None]:
        return "albedo", None

    def default_shading(self) -> Shading:
        return "albedo"

    def forward(
        self,
        features: Tensor,
        positions: Tensor,
        normal: Tensor | None,
        light_positions: Tensor,
        shading: Shading = "albedo",
        ambient_ratio: float | None = None,
    ) -> Tensor:
        return albedo_activation(self.config.albedo_activation, features[..., :3])
