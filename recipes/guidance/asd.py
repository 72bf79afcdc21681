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
from recipes.guidance.distillation import NoisedSample, ScoreDistillation
from recipes.guidance.parameterization import add_noise
from recipes.guidance.randomness import rand, randn_like
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting


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


@dataclass
class ShiftedSample(NoisedSample):
    """ASD's sample: SDS's, plus the shifted timesteps and the same noise at them.

    Attributes:
        t_shifted: t + Δt ``[B]``.
        x_t_shifted: ``x`` noised at ``t_shifted`` with the same noise (float32, detached).
    """

    t_shifted: torch.Tensor
    x_t_shifted: torch.Tensor


class AsynchronousScoreDistillation(ScoreDistillation[ASDConfig]):
    """ASD on any :class:`~recipes.guidance.denoiser.Denoiser`; ``x`` lives in the denoiser's space."""

    config_class = ASDConfig

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

    def noised(
        self, x: torch.Tensor, *, global_step: int = 0, generator: torch.Generator | None = None
    ) -> ShiftedSample:
        """Draw t, Δt and the noise (in that order, from ``generator``) and noise ``x`` at t and at t + Δt."""
        alphas_cumprod = self.denoiser.alphas_cumprod
        t = self.config.timesteps.sample(
            x.shape[0], global_step, self.denoiser.num_train_timesteps, x.device, generator
        )
        t_shifted = self.shifted_timesteps(t, global_step, generator)
        x0 = x.detach().float()
        noise = randn_like(x0, generator)
        with torch.no_grad():
            x_t = add_noise(alphas_cumprod, x0, noise, t)
            x_t_shifted = add_noise(alphas_cumprod, x0, noise, t_shifted)
        return ShiftedSample(x=x, t=t, noise=noise, x_t=x_t, t_shifted=t_shifted, x_t_shifted=x_t_shifted)

    def direction(self, sample: ShiftedSample, condition: Any, uncondition: Any) -> torch.Tensor:  # type: ignore[override]
        """ε̂_CFG(x_t, t) − ε_c(x_{t+Δt}, t + Δt), CFG on the first term only."""
        eps_first = predict_guided_noise(
            self.denoiser, sample.x_t, sample.t, condition, uncondition, self.config.guidance_scale
        ).guided
        eps_second = self.denoiser.predict_noise(
            sample.x_t_shifted, sample.t_shifted, positive_condition(condition)
        )
        return eps_first.float() - eps_second.float()
