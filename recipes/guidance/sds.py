"""Score Distillation Sampling (DreamFusion): grad = w(t)·(ε̂_CFG(x_t, t) − ε)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.guidance.cfg import predict_guided_noise
from recipes.guidance.distillation import DistillationOutput, NoisedSample, ScoreDistillation
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting


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


class ScoreDistillationSampling(ScoreDistillation[SDSConfig]):
    """SDS on any :class:`~recipes.guidance.denoiser.Denoiser`; ``x`` lives in the denoiser's space (latents or
    pixels).

    Calling it is :meth:`noised`, :meth:`predict` and :meth:`distill` in a row; several steps' samples can share
    one :meth:`predict` (``picard_training_step_slots``).
    """

    config_class = SDSConfig

    def direction(self, sample: NoisedSample, condition: Any, uncondition: Any) -> torch.Tensor:
        """ε̂ − ε: the CFG-guided prediction (:meth:`predict`) minus the noise."""
        return self.predict(sample.x_t, sample.t, condition, uncondition).float() - sample.noise

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
        return self.distill_direction(sample, eps_hat.float() - sample.noise, global_step=global_step)
