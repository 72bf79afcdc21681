"""VSD's particle score for a guidance model without a UNet (the closed-form prior): a camera-conditioned residual.

ProlificDreamer's particle model is the pretrained UNet with LoRA adapters that start at zero, given the
view-*independent* prompt and the camera through a learned embedding, and trained by denoising score matching on
the current renders (:mod:`recipes.guidance.lora`). The closed-form prior has no layers to adapt, so the particle
score here is the same construction one level up:

    ε̂_particle(x_t, t, camera) = ε̂_prior(x_t, t, no condition) + δ_φ(x_t, t, camera)

- ε̂_prior without a condition is the prior's view-independent prediction (for this prior, the camera *is* the
  condition, as the view-dependent prompt is for Stable Diffusion);
- δ_φ is a small convolutional network whose output layer starts at zero (LoRA's ``B = 0``), so the particle
  starts at the pretrained view-independent score, and whose camera embedding (the flattened 4×4 camera-to-world
  matrix through an MLP, zeros for "no camera") plays ProlificDreamer's class embedding;
- it is trained exactly like the LoRA: detached renders, its own t ~ U{0, …, T − 1} and noise, camera dropout,
  mean squared error to ε (the prior predicts ε).

So VSD on the closed-form prior starts as the prior's classifier score, w(t)·(ε̂_c − ε̂_u), and moves towards
"prior minus the score of the renders" as δ_φ learns the renders, which is what VSD's particle does. Only δ_φ
trains: it is an ``nn.Module`` (:class:`CameraResidual`) the system registers, while the prior stays outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.guidance.lora import CAMERA_DIM, ParticleCondition, camera_dropout_mask
from recipes.guidance.parameterization import add_noise
from recipes.guidance.randomness import randint, randn_like


@dataclass
class ResidualParticleConfig:
    """The residual particle score of the closed-form prior and its training.

    Attributes:
        width: channels of δ_φ's hidden layers. Default is 32.
        camera_dropout: probability of training a view without its camera (the unconditional branch used by the
            particle's camera CFG). Default is 0.1 (ProlificDreamer's).
        timestep_samples: (t, noise) draws per render in one particle loss. Default is 1.
        learning_rate, betas, eps, weight_decay: its AdamW. Default is 1e-3, (0.9, 0.99), 1e-15, 0.01: the LoRA's
            settings with a 10× learning rate, because the runs on this prior are hundreds of steps, not 25 000.
    """

    width: int = 32
    camera_dropout: float = 0.1
    timestep_samples: int = 1
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01


def timestep_features(t: Tensor, num_train_timesteps: int, dim: int) -> Tensor:
    """Sinusoidal features ``[B, dim]`` of integer timesteps (t / T in [0, 1) at geometric frequencies)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(1000.0) / half))
    angles = (t.float() / num_train_timesteps * 1000.0)[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class CameraResidual(nn.Module):
    """δ_φ(x_t, t, camera): three 3×3 convolutions modulated by timestep and camera embeddings, zero output at init.

    Args:
        channels: image channels of the prior's space (3 for RGB in [−1, 1]).
        width: hidden channels.
        num_train_timesteps: length of the noise schedule (for the timestep features).
    """

    def __init__(self, channels: int = 3, width: int = 32, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.width = width
        self.num_train_timesteps = num_train_timesteps
        self.time_embedding = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.camera_embedding = nn.Sequential(nn.Linear(CAMERA_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor | None) -> Tensor:
        batch = x_t.shape[0]
        camera = x_t.new_zeros(batch, CAMERA_DIM) if camera is None else camera.reshape(batch, CAMERA_DIM)
        embedding = self.time_embedding(timestep_features(t, self.num_train_timesteps, self.width))
        embedding = embedding + self.camera_embedding(camera.to(x_t))
        hidden = F.silu(self.conv_in(x_t) + embedding[:, :, None, None])
        hidden = F.silu(self.conv_mid(hidden) + embedding[:, :, None, None])
        return self.conv_out(hidden)


class ResidualParticleScore:
    """The particle score ε̂_prior(x_t, t) + δ_φ(x_t, t, camera) as a :class:`~recipes.guidance.Denoiser`.

    Not an ``nn.Module``: the prior must stay out of the system's parameters; :attr:`residual` is the trainable
    part (registered by the system). Conditions are :class:`~recipes.guidance.lora.ParticleCondition` whose
    ``text`` is ignored (the prior has no text) and whose ``camera`` is ``[B, 16]`` or None.
    """

    def __init__(self, prior: Any, residual: CameraResidual, config: ResidualParticleConfig) -> None:
        self.prior = prior
        self.residual = residual
        self.config = config
        self.alphas_cumprod = prior.alphas_cumprod
        self.num_train_timesteps = prior.num_train_timesteps

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (δ_φ's), named after the LoRA they stand for."""
        return list(self.residual.parameters())

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: ParticleCondition | None) -> Tensor:
        camera = None if condition is None else condition.camera
        with torch.no_grad():
            base = self.prior.predict_noise(x_t, t, None)
        return base + self.residual(x_t.float(), t, camera)

    def lora_loss(
        self, latents: Tensor, condition: ParticleCondition, generator: torch.Generator | None = None
    ) -> Tensor:
        """Denoising score matching of the renders ``latents`` (detached here), as the LoRA's loss."""
        cfg = self.config
        x0 = latents.detach().float().repeat_interleave(cfg.timestep_samples, dim=0)
        batch = x0.shape[0]
        t = randint(0, self.num_train_timesteps, (batch,), x0.device, generator)
        noise = randn_like(x0, generator)
        x_t = add_noise(self.alphas_cumprod, x0, noise, t)
        camera = condition.camera
        if camera is not None:
            camera = camera.reshape(-1, CAMERA_DIM).float().repeat_interleave(cfg.timestep_samples, dim=0)
            dropped = camera_dropout_mask(batch, cfg.camera_dropout, camera.device, generator)
            camera = torch.where(dropped[:, None], torch.zeros_like(camera), camera)
        prediction = self.predict_noise(x_t, t, ParticleCondition(condition.text, camera))
        return F.mse_loss(prediction, noise)

    def configure_lora_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over δ_φ with the configured hyperparameters."""
        cfg = self.config
        return torch.optim.AdamW(
            self.lora_parameters(), lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
