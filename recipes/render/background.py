"""Backgrounds: the colour a ray sees where the object is transparent, as a function of its direction.

Randomness: ``random_aug`` replaces a view's background by a random solid colour with probability
``random_aug_prob`` during training. Draws come from ``generator`` when given, else from the global
torch RNG (seeded per step by the Picard strategy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recipes.geometry.mlp import MLP, MLPConfig


def spherical_harmonics(directions: Tensor, degree: int = 3) -> Tensor:
    """Real spherical-harmonics basis (bands 0 … degree−1, ``degree²`` values) of unit vectors ``[..., 3]``."""
    if not 1 <= degree <= 4:
        raise ValueError("degree must be in 1..4")
    x, y, z = directions.unbind(-1)
    basis = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        basis += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        basis += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (3 * zz - 1),
            -1.0925484305920792 * x * z,
            0.5462742152960396 * (xx - yy),
        ]
    if degree > 3:
        basis += [
            -0.5900435899266435 * y * (3 * xx - yy),
            2.890611442640554 * x * y * z,
            -0.4570457994644658 * y * (5 * zz - 1),
            0.3731763325901154 * z * (5 * zz - 3),
            -0.4570457994644658 * x * (5 * zz - 1),
            1.445305721320277 * z * (xx - yy),
            -0.5900435899266435 * x * (xx - 3 * yy),
        ]
    return torch.stack(basis, dim=-1)


@dataclass
class NeuralEnvironmentMapConfig:
    """threestudio ``neural-environment-map-background``: SH degree 3 + 2×16 ReLU MLP, sigmoid colour."""

    sh_degree: int = 3
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(n_neurons=16, n_hidden_layers=2))
    random_aug: bool = False
    random_aug_prob: float = 0.5


class NeuralEnvironmentMapBackground(nn.Module):
    """A learnable colour per viewing direction, ``sigmoid(MLP(SH(d)))``."""

    def __init__(self, config: NeuralEnvironmentMapConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else NeuralEnvironmentMapConfig()
        self.network = MLP(self.config.sh_degree**2, 3, self.config.mlp)

    def forward(self, directions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Colours ``[B, H, W, 3]`` for unit ray directions ``[B, H, W, 3]``."""
        color = torch.sigmoid(self.network(spherical_harmonics(directions, self.config.sh_degree)))
        if self.training and self.config.random_aug:
            n = directions.shape[0]
            replace = torch.rand(n, generator=generator) < self.config.random_aug_prob
            solid = torch.rand(n, 3, generator=generator)
            per_view = (n,) + (1,) * (directions.dim() - 2)
            replace = replace.view(*per_view, 1).to(color.device)
            color = torch.where(replace, solid.view(*per_view, 3).to(color), color)
        return color


@dataclass
class SolidColorConfig:
    """A fixed (or learnable) uniform background colour."""

    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    learned: bool = False


class SolidColorBackground(nn.Module):
    """The same colour in every direction."""

    def __init__(self, config: SolidColorConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else SolidColorConfig()
        color = torch.tensor(self.config.color, dtype=torch.float32)
        if self.config.learned:
            self.color = nn.Parameter(color)
        else:
            self.register_buffer("color", color)

    def forward(self, directions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.color.to(directions).expand(*directions.shape[:-1], 3)
