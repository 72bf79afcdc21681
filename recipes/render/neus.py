"""NeuS volume rendering of a signed-distance field (TextMesh's coarse stage).

Each sample's opacity comes from the SDF at the two ends of its segment, estimated from the SDF and
its normal at the midpoint, passed through a logistic CDF of learned sharpness
``inv_std = exp(10 · variance)`` (NeuS, as in threestudio's ``neus-volume-renderer``). The cosine
between ray and normal is annealed from "always entering" to the true cosine over
``cos_anneal_end_steps`` steps. Marching, occupancy grid, material, background, randomness and
outputs are those of ``VolumeRenderer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recipes.geometry.nerf import FieldOutput
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig


class LearnedVariance(nn.Module):
    """One scalar ``variance``; the logistic sharpness is ``exp(10 · variance)`` clamped to [1e-6, 1e6]."""

    def __init__(self, init: float = 0.3) -> None:
        super().__init__()
        self.variance = nn.Parameter(torch.tensor(float(init)))

    def inv_std(self) -> Tensor:
        return torch.exp(10.0 * self.variance).clamp(1e-6, 1e6)


@dataclass
class NeuSRendererConfig(VolumeRendererConfig):
    """``VolumeRendererConfig`` plus the NeuS variance and cosine annealing (0: no annealing)."""

    variance_init: float = 0.3
    cos_anneal_end_steps: int = 0


def neus_alpha(
    sdf: Tensor, cosine: Tensor, deltas: Tensor, inv_std: Tensor, cos_anneal_ratio: float
) -> Tensor:
    """NeuS opacity of segments of length ``deltas`` whose midpoints have ``sdf`` and ray·normal ``cosine``."""
    annealed = -(
        nn.functional.relu(-cosine * 0.5 + 0.5) * (1.0 - cos_anneal_ratio)
        + nn.functional.relu(-cosine) * cos_anneal_ratio
    )
    next_cdf = torch.sigmoid((sdf + annealed * deltas * 0.5) * inv_std)
    prev_cdf = torch.sigmoid((sdf - annealed * deltas * 0.5) * inv_std)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


class NeuSRenderer(VolumeRenderer):
    """Render ``Cameras`` through an SDF field (``ImplicitSDF``); adds ``sdf_gradient [M, 3]`` to the outputs."""

    def __init__(
        self,
        geometry: nn.Module,
        material: nn.Module,
        background: nn.Module,
        config: NeuSRendererConfig | None = None,
    ) -> None:
        config = config if config is not None else NeuSRendererConfig()
        super().__init__(geometry, material, background, config)
        self.variance = LearnedVariance(config.variance_init)
        self.cos_anneal_ratio = 1.0 if config.cos_anneal_end_steps <= 0 else 0.0

    def anneal(self, step: int) -> None:
        """Set the cosine annealing ratio of ``step`` (a pure function of the step)."""
        end = self.config.cos_anneal_end_steps
        self.cos_anneal_ratio = 1.0 if end <= 0 else min(1.0, step / end)

    def update_step(self, step: int) -> None:
        self.anneal(step)
        super().update_step(step)

    def occupancy_fn(self, points: Tensor) -> Tensor:
        """Opacity of one render step at ``points``, assuming the ray crosses the surface head-on."""
        sdf = self.geometry.sdf(points)
        deltas = torch.full_like(sdf, self.render_step_size)
        return neus_alpha(sdf, -torch.ones_like(sdf), deltas, self.variance.inv_std(), 1.0)

    def _wants_normal(self) -> bool:
        return True

    def _alpha(self, sample: FieldOutput, directions: Tensor, deltas: Tensor) -> Tensor:
        cosine = (directions * sample.normal).sum(-1)
        return neus_alpha(sample.sdf, cosine, deltas, self.variance.inv_std(), self.cos_anneal_ratio)
