"""VSD's particle score for the weight-free closed-form prior: the prior fine-tuned on the renders.

ProlificDreamer's particle model is the pretrained diffusion model with LoRA adapters that start at zero, given
the camera, and fine-tuned by denoising score matching on the current renders (:mod:`recipes.guidance.lora`).
The closed-form prior (:mod:`recipes.guidance.closed_form`) has no layers to adapt, but it has weights all the
same: its reference images y_i, through which it is the exact denoiser of their mixture. The particle here is that
prior with an adapter on those weights,

    ε̂_particle(x_t, t, camera) = ε̂ of the closed-form denoiser of the references y_i + Δ_i, seen from ``camera``,

- Δ starts at zero (LoRA's ``B = 0``), so the particle starts as the pretrained model;
- the camera enters through the prior's own view kernel (ProlificDreamer's camera embedding); a dropped camera is
  the unconditional mixture;
- Δ is trained exactly like the LoRA: detached renders, its own t ~ U{0, …, T − 1} and noise, camera dropout
  0.1, mean squared error to ε, AdamW.

As Δ learns, the adapted references near each camera move towards the renders seen from there, so the particle
becomes the denoiser of the *rendered* distribution, which is what VSD's particle estimates: VSD's gradient
w(t)·(ε̂_pretrained − ε̂_particle) then compares the prior with the renders' own score. Only Δ trains: it is an
``nn.Module`` (:class:`ReferenceAdapter`) the system registers, while the prior stays outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.guidance.lora import (
    CAMERA_DIM,
    ParticleCondition,
    camera_dropout_mask,
    noised_samples,
    particle_optimizer,
)


@dataclass
class PriorParticleConfig:
    """The particle score of the closed-form prior and its training.

    Attributes:
        camera_dropout: probability of training a view without its camera (the unconditional branch used by the
            particle's camera CFG). Default is 0.1 (ProlificDreamer's).
        timestep_samples: (t, noise) draws per render in one particle loss. Default is 1.
        learning_rate, betas, eps, weight_decay: AdamW over the adapter. Default is 0.1, (0.9, 0.99), 1e-15, 0:
            LoRA's betas and eps; the learning rate is in the references' pixel units ([−1, 1]) and was the best of
            0.01, 0.05, 0.1 and 0.2 on the 200-step CPU config (each reference is near the camera in about one step
            of nine, so it must follow the renders in few updates); no weight decay (it would pull the adapted
            references back to the prior's, which the LoRA's decay does not do to its base weights).
        start: where a fresh fit's adapter starts. ``"prior"``: Δ = 0, the particle is the prior (LoRA's
            ``B = 0``). ``"renders"``: Δ = the scene's renders from the reference cameras minus the references, so
            the particle starts as the denoiser of what the scene renders now. On this prior the pretrained model
            *is* the target distribution, so a particle that starts as the prior tells VSD the scene is already
            right (at CFG 1 its gradient is 0 until Δ has followed the renders, which takes each reference about
            20 updates); a stage that starts from a converted scene (ProlificDreamer's texture stage) then hardly
            learns. Default is ``"prior"``.
    """

    camera_dropout: float = 0.1
    timestep_samples: int = 1
    learning_rate: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0
    start: Literal["prior", "renders"] = "prior"


class ReferenceAdapter(nn.Module):
    """Δ, one additive image per reference of the prior, zero at start.

    Args:
        shape: the references' shape ``[N, C, H, W]`` (``ClosedFormPrior.references.shape``).
    """

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))


class PriorParticleScore:
    """The closed-form prior with adapted references, as a :class:`~recipes.guidance.Denoiser`.

    Not an ``nn.Module``: the prior must stay out of the system's parameters; :attr:`adapter` is the trainable part
    (registered by the system). Conditions are :class:`~recipes.guidance.lora.ParticleCondition` whose ``text`` is
    ignored (the prior has no text) and whose ``camera`` is a flattened camera-to-world matrix ``[B, 16]`` or None.
    """

    def __init__(self, prior: Any, adapter: ReferenceAdapter, config: PriorParticleConfig) -> None:
        if tuple(adapter.delta.shape) != tuple(prior.references.shape):
            raise ValueError(
                f"the particle adapter has shape {tuple(adapter.delta.shape)} but the prior's references are "
                f"{tuple(prior.references.shape)}; build it from the same guidance.closed_form settings"
            )
        self.prior = prior
        self.adapter = adapter
        self.config = config
        self.alphas_cumprod = prior.alphas_cumprod
        self.num_train_timesteps = prior.num_train_timesteps

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (the adapter), named after the LoRA they stand for."""
        return [self.adapter.delta]

    def start_from(self, renders: Tensor) -> None:
        """Set Δ so that the adapted references are ``renders [N, C, H, W]`` (the denoiser's space, one per
        reference camera, in the references' order)."""
        references = self.prior.references
        if tuple(renders.shape) != tuple(references.shape):
            raise ValueError(
                f"start_from needs one render per reference, {tuple(references.shape)}, got {tuple(renders.shape)}; "
                "particle.prior.start: renders works on a one-object prior (one render per reference camera): use "
                "start: prior with a prior of several objects (the amortized recipe)"
            )
        with torch.no_grad():
            delta = renders.to(references) - references
            self.adapter.delta.copy_(delta.to(self.adapter.delta))

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: ParticleCondition | None) -> Tensor:
        """ε̂ of the closed-form denoiser of the adapted references (differentiable in the adapter)."""
        camera = None if condition is None else condition.camera
        references = self.prior.references + self.adapter.delta.to(self.prior.references)
        flat = references.flatten(1)
        alpha_bar = self.alphas_cumprod[t.to(self.alphas_cumprod.device).long()].reshape(-1, 1)
        x = x_t.to(flat).flatten(1)
        logits = (alpha_bar.sqrt() * (x @ flat.T) - 0.5 * alpha_bar * flat.square().sum(1)) / (
            1.0 - alpha_bar
        )
        view = None if camera is None else self.prior.view_logits(camera.reshape(-1, 4, 4), x.shape[0])
        weights = torch.softmax(logits if view is None else logits + view.to(logits), dim=1)
        x0 = (weights @ flat).reshape(x_t.shape)
        eps = (x_t.to(flat) - alpha_bar.sqrt().view(-1, *([1] * (x_t.dim() - 1))) * x0) / (
            (1.0 - alpha_bar).sqrt().view(-1, *([1] * (x_t.dim() - 1)))
        )
        return eps

    def lora_loss(
        self, latents: Tensor, condition: ParticleCondition, generator: torch.Generator | None = None
    ) -> Tensor:
        """Denoising score matching of the renders ``latents`` (detached here), as the LoRA's loss."""
        cfg = self.config
        x0, t, noise, x_t = noised_samples(
            latents, self.alphas_cumprod, self.num_train_timesteps, cfg.timestep_samples, generator
        )
        batch = x0.shape[0]
        camera = condition.camera
        if camera is not None:
            camera = camera.reshape(-1, CAMERA_DIM).float().repeat_interleave(cfg.timestep_samples, dim=0)
            dropped = camera_dropout_mask(batch, cfg.camera_dropout, camera.device, generator)
            kept = self.predict_noise(x_t, t, ParticleCondition(condition.text, camera))
            free = self.predict_noise(x_t, t, None)
            prediction = torch.where(dropped.view(-1, *([1] * (x_t.dim() - 1))), free, kept)
        else:
            prediction = self.predict_noise(x_t, t, None)
        return F.mse_loss(prediction, noise)

    def configure_lora_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the adapter with the configured hyperparameters."""
        return particle_optimizer(self.lora_parameters(), self.config)
