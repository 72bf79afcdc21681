"""Asynchronous Score Distillation (ScaleDreamer).

grad = w(t)·(ε̂_CFG(x_t, t) − ε_c(x_{t+Δt}, t + Δt)) with one noise ε shared by both noisy inputs,
Δt ~ U[0, η·(t − T_min)] (T_min the current, possibly annealed, lower bound), CFG on the first term only.
With η = 0 this is w(t)·(s − 1)·(ε_c − ε_u), the classifier score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.guidance.cfg import positive_condition, predict_guided_noise
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.distillation import DistillationOutput, finalize_gradient, surrogate_loss
from recipes.guidance.parameterization import add_noise
from recipes.guidance.randomness import rand, randn_like
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting, scalar_at, timestep_weight


@dataclass
class ASDConfig:
    """ASD settings (ScaleDreamer defaults).

    Attributes:
        guidance_scale: CFG scale of the first term, diffusers' convention (ScaleDreamer uses it too).
        shift_ratio: η, the maximum shift as a fraction of t − T_min (ScaleDreamer's ``plus_ratio``).
        random_shift: draw Δt uniformly in [0, η(t − T_min)] (``plus_random``, true in its configs);
            false uses the maximum shift.
        timesteps: t range and its annealing.
        weighting: w(t), evaluated at t (not t + Δt).
        grad_clip: element-wise clamp of the gradient, or None.
    """

    guidance_scale: float = 7.5
    shift_ratio: float = 0.1
    random_shift: bool = True
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    weighting: Weighting = "sds"
    grad_clip: ScalarSchedule | None = None


class AsynchronousScoreDistillation:
    """ASD on any :class:`Denoiser`; ``x`` lives in the denoiser's space."""

    def __init__(self, denoiser: Denoiser, config: ASDConfig | None = None) -> None:
        self.denoiser = denoiser
        self.config = config or ASDConfig()

    def shifted_timesteps(
        self, t: torch.Tensor, global_step: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t + Δt with Δt ~ U[0, η(t − T_min)], kept inside the training schedule."""
        cfg = self.config
        num_train_timesteps = self.denoiser.num_train_timesteps
        min_step, _ = cfg.timesteps.range_at(global_step, num_train_timesteps)
        max_shift = cfg.shift_ratio * (t - min_step).float()
        max_shift = torch.minimum(max_shift.clamp(min=0.0), (num_train_timesteps - 1 - t).float())
        if cfg.random_shift:
            max_shift = max_shift * rand(tuple(t.shape), t.device, generator)
        return (t + max_shift.floor().long()).clamp(1, num_train_timesteps - 1)

    def __call__(
        self,
        x: torch.Tensor,
        condition: Any,
        uncondition: Any = None,
        *,
        global_step: int = 0,
        generator: torch.Generator | None = None,
    ) -> DistillationOutput:
        """Distill into ``x`` ([B, …], differentiable); t, Δt and ε come from ``generator`` or the global RNG."""
        cfg = self.config
        alphas_cumprod = self.denoiser.alphas_cumprod
        t = cfg.timesteps.sample(
            x.shape[0], global_step, self.denoiser.num_train_timesteps, x.device, generator
        )
        t_shifted = self.shifted_timesteps(t, global_step, generator)
        x0 = x.detach().float()
        noise = randn_like(x0, generator)
        with torch.no_grad():
            eps_first = predict_guided_noise(
                self.denoiser,
                add_noise(alphas_cumprod, x0, noise, t),
                t,
                condition,
                uncondition,
                cfg.guidance_scale,
            ).guided
            eps_second = self.denoiser.predict_noise(
                add_noise(alphas_cumprod, x0, noise, t_shifted), t_shifted, positive_condition(condition)
            )
        weight = timestep_weight(cfg.weighting, alphas_cumprod, t).view(-1, *([1] * (x.dim() - 1)))
        grad_clip = None if cfg.grad_clip is None else scalar_at(cfg.grad_clip, global_step)
        grad = finalize_gradient(weight * (eps_first.float() - eps_second.float()), grad_clip)
        return DistillationOutput(loss=surrogate_loss(x, grad), grad=grad, t=t)
