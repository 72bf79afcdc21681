"""Variational Score Distillation (ProlificDreamer).

grad = w(t)·(ε̂_pretrained,CFG(x_t, t, y_view) − ε̂_particle(x_t, t, y, camera)), where the particle score
is a LoRA-adapted UNet trained alongside the scene on its renders (:mod:`recipes.guidance.lora`).

Picard: the LoRA is *rank-local* state. It is not part of the Picard parameters, never gathered nor
compared; each rank trains its own copy right after each gradient evaluation, as in the paper. The
module exposes the three things the strategy needs: :meth:`lora_parameters`, :meth:`lora_loss` (on the
latents of the batch just evaluated) and :meth:`configure_lora_optimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.guidance.cfg import predict_guided_noise
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.distillation import DistillationOutput, noised_sample, weighted_distillation
from recipes.guidance.lora import LoRAParticleScore, ParticleCondition
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting


@dataclass
class VSDConfig:
    """VSD settings (ProlificDreamer defaults; both scales in diffusers' CFG convention, as in its code).

    Attributes:
        guidance_scale: CFG of the pretrained model over the (negative) prompt.
        guidance_scale_lora: camera CFG of the particle model (1.0 = camera-conditional prediction only).
        timesteps: t range; ProlificDreamer anneals the maximum with ``[5000, 0.98, 0.5, 5001]``.
        weighting: w(t).
        grad_clip: element-wise clamp of the gradient, or None.
    """

    guidance_scale: float = 7.5
    guidance_scale_lora: float = 1.0
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    weighting: Weighting = "sds"
    grad_clip: ScalarSchedule | None = None


class VariationalScoreDistillation:
    """VSD from a pretrained :class:`Denoiser` and a LoRA particle score on the same noise schedule."""

    def __init__(
        self, pretrained: Denoiser, particle: LoRAParticleScore, config: VSDConfig | None = None
    ) -> None:
        if pretrained.num_train_timesteps != particle.num_train_timesteps or not torch.allclose(
            pretrained.alphas_cumprod.cpu(), particle.alphas_cumprod.cpu(), atol=1e-6
        ):
            raise ValueError("the pretrained and the particle model must share one noise schedule")
        self.pretrained = pretrained
        self.particle = particle
        self.config = config or VSDConfig()

    def __call__(
        self,
        x: torch.Tensor,
        condition: Any,
        uncondition: Any,
        particle_condition: ParticleCondition,
        *,
        global_step: int = 0,
        generator: torch.Generator | None = None,
    ) -> DistillationOutput:
        """Distill into ``x`` ([B, …] latents, differentiable).

        ``condition``/``uncondition`` go to the pretrained model (view-dependent prompt, negative prompt);
        ``particle_condition`` carries the view-independent prompt and the cameras [B, 16].
        """
        cfg = self.config
        sample = noised_sample(self.pretrained, cfg.timesteps, x, global_step, generator)
        with torch.no_grad():
            eps_pretrained = predict_guided_noise(
                self.pretrained, sample.x_t, sample.t, condition, uncondition, cfg.guidance_scale
            ).guided
            eps_particle = predict_guided_noise(
                self.particle,
                sample.x_t,
                sample.t,
                particle_condition,
                particle_condition.without_camera(),
                cfg.guidance_scale_lora,
            ).guided
        direction = eps_pretrained.float() - eps_particle.float().to(x.device)
        return weighted_distillation(
            x, sample.t, direction, self.pretrained, cfg.weighting, cfg.grad_clip, global_step
        )

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """Rank-local trainables: LoRA adapters + camera embedding."""
        return self.particle.lora_parameters()

    def lora_loss(
        self,
        latents: torch.Tensor,
        particle_condition: ParticleCondition,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The LoRA loss for a batch (latents are detached; own t, noise and camera dropout)."""
        return self.particle.lora_loss(latents, particle_condition, generator)

    def configure_lora_optimizer(self) -> torch.optim.Optimizer:
        """The LoRA's own AdamW (see :class:`~recipes.guidance.lora.LoRAParticleConfig`)."""
        return self.particle.configure_lora_optimizer()
