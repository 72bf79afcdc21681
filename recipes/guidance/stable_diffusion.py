"""Stable Diffusion as a latent-space :class:`Denoiser` (UNet + VAE + noise schedule from a diffusers folder).

Only the parts that score distillation needs are loaded: ``unet``, ``vae`` and ``scheduler``. The text
encoder is loaded separately, once, by :mod:`recipes.guidance.prompts` (see :meth:`text_encoding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recipes.guidance.loading import (
    TorchDType,
    default_device,
    load_noise_schedule,
    load_pretrained,
    resolve_dtype,
)
from recipes.guidance.parameterization import PredictionType
from recipes.guidance.prompts import PretrainedTextEncoding
from recipes.guidance.unet_denoiser import TextConditionedUNetDenoiser

DEFAULT_STABLE_DIFFUSION = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class StableDiffusionConfig:
    """Which Stable Diffusion checkpoint to distill and how to run it.

    Attributes:
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout.
        torch_dtype: ``auto`` = float16 on GPU, float32 on CPU.
        image_resolution: renders are resized to this (bilinear) before VAE encoding (512 for SD 2.1 base).
    """

    pretrained_model_name_or_path: str = DEFAULT_STABLE_DIFFUSION
    torch_dtype: TorchDType = "auto"
    image_resolution: int = 512


class StableDiffusionDenoiser(TextConditionedUNetDenoiser):
    """Stable Diffusion's latent UNet as an ε-predictor, with the VAE to get renders into latent space.

    ``condition`` is a text-embedding tensor [B or 1, L, D]; see :class:`TextConditionedUNetDenoiser`.
    """

    CONFIG_HINT = "guidance.model.pretrained_model_name_or_path"

    def __init__(
        self,
        unet: Any,
        vae: Any,
        alphas_cumprod: torch.Tensor,
        prediction_type: PredictionType,
        config: StableDiffusionConfig,
    ) -> None:
        super().__init__(unet, alphas_cumprod, prediction_type)
        self.vae = vae.eval().requires_grad_(False)
        self.config = config

    @classmethod
    def from_pretrained(
        cls, config: StableDiffusionConfig | None = None, device: torch.device | str | None = None
    ) -> StableDiffusionDenoiser:
        """Load UNet, VAE and schedule from a hub id or local folder (fp16 on GPU, fp32 on CPU by default)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        config = config or StableDiffusionConfig()
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(config.torch_dtype, device)
        path = config.pretrained_model_name_or_path
        alphas_cumprod, _, prediction_type = load_noise_schedule(path, cls.CONFIG_HINT)
        unet = load_pretrained(
            UNet2DConditionModel, path, "unet", config_hint=cls.CONFIG_HINT, torch_dtype=dtype
        )
        vae = load_pretrained(AutoencoderKL, path, "vae", config_hint=cls.CONFIG_HINT, torch_dtype=dtype)
        return cls(unet.to(device), vae.to(device), alphas_cumprod, prediction_type, config)

    def to(self, device: torch.device | str) -> StableDiffusionDenoiser:
        """Move the model (in place) and return it."""
        super().to(device)
        self.vae.to(device)
        return self

    def text_encoding(self) -> PretrainedTextEncoding:
        """The matching CLIP text encoder, for :meth:`PromptEmbeddings.compute`."""
        return PretrainedTextEncoding(
            self.config.pretrained_model_name_or_path, "clip", self.config.torch_dtype, self.CONFIG_HINT
        )

    def encode_images(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Differentiable VAE encoding of renders ``rgb`` [B, 3, H, W] in [0, 1] to scaled latents (float32).

        The posterior sample draws from ``generator`` (or the global RNG), like every other randomness.
        """
        size = self.config.image_resolution
        pixels = F.interpolate(rgb.float(), (size, size), mode="bilinear", align_corners=False) * 2.0 - 1.0
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        latents = posterior.sample(generator=generator) * self.vae.config.scaling_factor
        return latents.float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents back to images [B, 3, H, W] in [0, 1] (for logging)."""
        pixels = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return (pixels.float() * 0.5 + 0.5).clamp(0.0, 1.0)
