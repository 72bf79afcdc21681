"""Score Distillation Sampling (DreamFusion): grad = w(t)·(ε̂_CFG(x_t, t) − ε)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.guidance.cfg import predict_guided_noise
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.distillation import DistillationOutput, finalize_gradient, surrogate_loss
from recipes.guidance.parameterization import add_noise
from recipes.guidance.randomness import randn_like
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting, scalar_at, timestep_weight


@dataclass
class SDSConfig:
    """Score Distillation Sampling settings.

    Attributes:
        guidance_scale: CFG scale in diffusers' convention ε_u + s·(ε_c − ε_u). threestudio's SD and IF
            configs say 100 and 20 in *their* convention, i.e. 101 and 21 here; DreamGaussian's 100 is
            already in this convention.
        timesteps: t range and its annealing.
        weighting: w(t): ``sds`` (1 − ᾱ_t), ``uniform`` or ``fantasia3d`` (√ᾱ_t·(1 − ᾱ_t)).
        grad_clip: element-wise clamp of the gradient (a scalar schedule), or None.
    """

    guidance_scale: float = 100.0
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    weighting: Weighting = "sds"
    grad_clip: ScalarSchedule | None = None


class ScoreDistillationSampling:
    """SDS on any :class:`Denoiser`; ``x`` lives in the denoiser's space (latents or pixels)."""

    def __init__(self, denoiser: Denoiser, config: SDSConfig | None = None) -> None:
        self.denoiser = denoiser
        self.config = config or SDSConfig()

    def __call__(
        self,
        x: torch.Tensor,
        condition: Any,
        uncondition: Any = None,
        *,
        global_step: int = 0,
        generator: torch.Generator | None = None,
    ) -> DistillationOutput:
        """Distill the denoiser's score into ``x`` ([B, …], differentiable).

        ``t`` and the noise come from ``generator`` when given, otherwise from the global torch RNG. This is
        :meth:`noised`, :meth:`predict` and :meth:`distill` in a row; several steps' samples can share one
        :meth:`predict` (``picard_training_step_slots``).
        """
        sample = self.noised(x, global_step=global_step, generator=generator)
        eps_hat = self.predict(sample.x_t, sample.t, condition, uncondition)
        return self.distill(sample, eps_hat, global_step=global_step)

    def noised(
        self, x: torch.Tensor, *, global_step: int = 0, generator: torch.Generator | None = None
    ) -> NoisedSample:
        """Draw ``t`` and the noise (in that order, from ``generator``) and noise ``x`` to ``x_t``."""
        return noised_sample(self.denoiser, self.config.timesteps, x, global_step, generator)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any, uncondition: Any) -> torch.Tensor:
        """The CFG-guided noise prediction ε̂ for ``x_t`` at ``t`` (a batch of any size, no gradient)."""
        return predict_guided_noise(
            self.denoiser, x_t, t, condition, uncondition, self.config.guidance_scale
        ).guided

    def distill(
        self, sample: NoisedSample, eps_hat: torch.Tensor, *, global_step: int = 0
    ) -> DistillationOutput:
        """The SDS gradient w(t)·(ε̂ − ε) of ``sample`` and its surrogate loss."""
        cfg = self.config
        direction = eps_hat.float() - sample.noise
        return weighted_distillation(
            sample.x, sample.t, direction, self.denoiser, cfg.weighting, cfg.grad_clip, global_step
        )


def noised_sample(
    denoiser: Denoiser,
    timesteps: TimestepSchedule,
    x: torch.Tensor,
    global_step: int,
    generator: torch.Generator | None,
) -> NoisedSample:
    """Draw ``t`` and the noise (in that order, from ``generator``) and noise ``x`` to ``x_t`` (SDS and CSD)."""
    t = timesteps.sample(x.shape[0], global_step, denoiser.num_train_timesteps, x.device, generator)
    noise = randn_like(x.detach().float(), generator)
    with torch.no_grad():
        x_t = add_noise(denoiser.alphas_cumprod, x.detach().float(), noise, t)
    return NoisedSample(x=x, t=t, noise=noise, x_t=x_t)


def weighted_distillation(
    x: torch.Tensor,
    t: torch.Tensor,
    direction: torch.Tensor,
    denoiser: Denoiser,
    weighting: Weighting,
    grad_clip: ScalarSchedule | None,
    global_step: int,
) -> DistillationOutput:
    """The gradient w(t)·``direction`` (clamped by ``grad_clip`` at ``global_step``) and its surrogate loss."""
    weight = timestep_weight(weighting, denoiser.alphas_cumprod, t).view(-1, *([1] * (x.dim() - 1)))
    clip = None if grad_clip is None else scalar_at(grad_clip, global_step)
    grad = finalize_gradient(weight * direction, clip)
    return DistillationOutput(loss=surrogate_loss(x, grad), grad=grad, t=t)


@dataclass
class NoisedSample:
    """SDS's input of one step before the denoiser sees it.

    Attributes:
        x: the differentiable input ``[B, …]``.
        t: its timesteps ``[B]``.
        noise: the noise ε added (float32).
        x_t: the noised input (float32, detached).
    """

    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
