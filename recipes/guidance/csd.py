"""Classifier Score Distillation (Yu et al. 2023, "Text-to-3D with Classifier Score Distillation").

    grad = ω·w(t)·(ε(x_t, t, y) − ε(x_t, t, ∅)),   x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε,

the classifier score alone: SDS's CFG residual without its denoising term. ``∅`` is the unconditional branch of
the recipe (the negative prompt; "" by default). With a :class:`~recipes.guidance.cfg.PerpNegCondition`,
ε(x_t, y) − ε(x_t, ∅) is replaced by the Perp-Neg direction e_pos + Σ_i w_i·perp(ε_i − ε_u, e_pos).

Relation to SDS at the same t and noise (and ω = s, no clamp): SDS − CSD = w(t)·(ε(x_t, t, ∅) − ε), since SDS is
w(t)·(ε_u + s·(ε_c − ε_u) − ε). ASD with η = 0 is CSD with ω = s − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.guidance.cfg import predict_guided_noise
from recipes.guidance.distillation import NoisedSample, ScoreDistillation
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting


@dataclass
class CSDConfig:
    """Classifier Score Distillation settings.

    Attributes:
        guidance_scale: ω, the weight of the classifier score. Default is 7.5 (ScaleDreamer's CFG scale, so that
            CSD and ASD compare at one scale; with Adam only the direction and relative size across steps matter).
        timesteps: t range and its annealing. Default is U{20 … 980}, no annealing.
        weighting: w(t): ``sds`` (1 − ᾱ_t), ``uniform`` or ``fantasia3d``. Default is ``sds``.
        grad_clip: element-wise clamp of the gradient (a scalar schedule), or None. Default is None.
    """

    guidance_scale: float = 7.5
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    weighting: Weighting = "sds"
    grad_clip: ScalarSchedule | None = None


class ClassifierScoreDistillation(ScoreDistillation[CSDConfig]):
    """CSD on any :class:`~recipes.guidance.denoiser.Denoiser`; ``x`` lives in the denoiser's space (latents or
    pixels). It draws ``t`` and the noise as :class:`~recipes.guidance.sds.ScoreDistillationSampling` does (the same
    draws, in the same order)."""

    config_class = CSDConfig

    def direction(self, sample: NoisedSample, condition: Any, uncondition: Any) -> torch.Tensor:
        """ω·(ε_c − ε_u), or ω times the Perp-Neg direction."""
        # at s = 2 predict_guided_noise always runs the unconditional pass and gives ε_u + 2·d, with d = ε_c − ε_u
        # (or the Perp-Neg direction)
        guided = predict_guided_noise(self.denoiser, sample.x_t, sample.t, condition, uncondition, 2.0)
        assert guided.uncond is not None
        return 0.5 * self.config.guidance_scale * (guided.guided.float() - guided.uncond.float())
