"""Zero-1-to-3 (image-to-3D) as a latent :class:`Denoiser`, loaded from the diffusers folder layout.

diffusers core ships no Zero123 pipeline, so the parts are loaded one by one from the layout of
``ashawkey/zero123-xl-diffusers`` (the checkpoint DreamGaussian uses)::

    unet/                    UNet2DConditionModel, 8 input channels (noisy latent ⊕ reference latent)
    vae/                     AutoencoderKL
    image_encoder/           CLIPVisionModelWithProjection
    feature_extractor/       CLIPImageProcessor (only its resize/crop/normalization settings are used)
    clip_camera_projection/  Linear(D + 4 → D) over [CLIP image embedding, camera delta]
    scheduler/               the noise schedule

Conditioning: the reference image's CLIP embedding concatenated with the camera delta
[Δpolar (rad), sin Δazimuth, cos Δazimuth, Δradius] and projected, as cross-attention context; plus the
reference image's VAE latent concatenated to the noisy latent. The unconditional branch is zeros for
both. Polar is 90° − elevation, so Δpolar = −Δelevation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recipes.guidance.loading import (
    TorchDType,
    default_device,
    load_noise_schedule,
    load_pretrained,
    resolve_dtype,
)
from recipes.guidance.parameterization import PredictionType, epsilon_from_prediction

DEFAULT_ZERO123 = "ashawkey/zero123-xl-diffusers"


@functools.cache
def _camera_projection_class() -> type:
    """``CLIPCameraProjection`` as a diffusers model, so ``from_pretrained`` reads the checkpoint's
    ``clip_camera_projection`` folder (config keys and weight names follow that layout)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class CLIPCameraProjection(ModelMixin, ConfigMixin):
        """Projects [CLIP image embedding ⊕ camera delta] back to the embedding width."""

        @register_to_config
        def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4) -> None:
            super().__init__()
            self.proj = nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return self.proj(embedding)

    return CLIPCameraProjection


@dataclass
class Zero123Config:
    """Which Zero-1-to-3 checkpoint to distill and how to run it.

    Attributes:
        pretrained_model_name_or_path: hub id or local folder in the layout above.
        torch_dtype: ``auto`` = float16 on GPU, float32 on CPU.
        image_resolution: renders and the reference are resized to this before VAE encoding (256).
    """

    pretrained_model_name_or_path: str = DEFAULT_ZERO123
    torch_dtype: TorchDType = "auto"
    image_resolution: int = 256


@dataclass
class Zero123Reference:
    """The encoded input view: CLIP image embedding [1, 1, D] and VAE latent (unscaled, posterior mode)."""

    clip_embedding: torch.Tensor
    latent: torch.Tensor


@dataclass
class Zero123Condition:
    """Per-view condition: projected cross-attention context [B, 1, D] and reference latent [B, 4, h, w]."""

    context: torch.Tensor
    latent: torch.Tensor


class Zero123Denoiser:
    """Zero-1-to-3's UNet as an ε-predictor over novel-view latents; not an ``nn.Module`` (frozen weights)."""

    CONFIG_HINT = "guidance.model.pretrained_model_name_or_path"

    def __init__(
        self,
        unet: Any,
        vae: Any,
        image_encoder: Any,
        camera_projection: Any,
        image_processor: Any,
        alphas_cumprod: torch.Tensor,
        prediction_type: PredictionType,
        config: Zero123Config,
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.camera_projection = camera_projection.eval().requires_grad_(False)
        self.clip_size = int(image_processor.crop_size["height"])
        self.clip_resize = int(image_processor.size.get("shortest_edge", self.clip_size))
        self.clip_mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.prediction_type = prediction_type
        self.config = config
        self.alphas_cumprod = alphas_cumprod.to(self.device)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_pretrained(
        cls, config: Zero123Config | None = None, device: torch.device | str | None = None
    ) -> Zero123Denoiser:
        """Load every part from a hub id or local folder (fp16 on GPU, fp32 on CPU by default)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        config = config or Zero123Config()
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(config.torch_dtype, device)
        path, hint = config.pretrained_model_name_or_path, cls.CONFIG_HINT
        alphas_cumprod, _, prediction_type = load_noise_schedule(path, hint)
        parts = {
            "unet": (UNet2DConditionModel, "unet"),
            "vae": (AutoencoderKL, "vae"),
            "image_encoder": (CLIPVisionModelWithProjection, "image_encoder"),
            "camera_projection": (_camera_projection_class(), "clip_camera_projection"),
        }
        loaded = {
            name: load_pretrained(model_cls, path, subfolder, config_hint=hint, torch_dtype=dtype).to(device)
            for name, (model_cls, subfolder) in parts.items()
        }
        image_processor = load_pretrained(CLIPImageProcessor, path, "feature_extractor", config_hint=hint)
        return cls(
            image_processor=image_processor,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            config=config,
            **loaded,
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str) -> Zero123Denoiser:
        """Move the model (in place) and return it."""
        for module in (self.unet, self.vae, self.image_encoder, self.camera_projection):
            module.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def _resize(self, rgb: torch.Tensor) -> torch.Tensor:
        size = self.config.image_resolution
        return F.interpolate(rgb.float(), (size, size), mode="bilinear", align_corners=False)

    def encode_images(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Differentiable VAE encoding of renders [B, 3, H, W] in [0, 1] to scaled latents (float32)."""
        pixels = (self._resize(rgb) * 2.0 - 1.0).to(self.device, self.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        return (posterior.sample(generator=generator) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_reference(self, rgb: torch.Tensor) -> Zero123Reference:
        """Encode the input view [1, 3, H, W] in [0, 1] (already composited on its background)."""
        clip_pixels = F.interpolate(
            rgb.float(), (self.clip_resize, self.clip_resize), mode="bicubic", antialias=True
        )
        offset = (self.clip_resize - self.clip_size) // 2
        clip_pixels = clip_pixels[..., offset : offset + self.clip_size, offset : offset + self.clip_size]
        clip_pixels = (clip_pixels.clamp(0, 1) - self.clip_mean) / self.clip_std
        embedding = self.image_encoder(clip_pixels.to(self.device, self.dtype)).image_embeds[:, None, :]
        latent = self.vae.encode(
            (self._resize(rgb) * 2.0 - 1.0).to(self.device, self.dtype)
        ).latent_dist.mode()
        return Zero123Reference(clip_embedding=embedding, latent=latent)

    @torch.no_grad()
    def condition(
        self,
        reference: Zero123Reference,
        delta_elevation_deg: torch.Tensor,
        delta_azimuth_deg: torch.Tensor,
        delta_radius: torch.Tensor | None = None,
    ) -> Zero123Condition:
        """Condition for novel views at the given camera deltas from the reference view (each [B])."""
        batch = delta_elevation_deg.shape[0]
        delta_radius = torch.zeros_like(delta_elevation_deg) if delta_radius is None else delta_radius
        azimuth = torch.deg2rad(delta_azimuth_deg.float())
        camera = torch.stack(
            [torch.deg2rad(-delta_elevation_deg.float()), azimuth.sin(), azimuth.cos(), delta_radius.float()],
            dim=-1,
        )
        embedding = reference.clip_embedding.expand(batch, -1, -1)
        context = self.camera_projection(
            torch.cat([embedding, camera[:, None, :].to(self.device, embedding.dtype)], dim=-1)
        )
        return Zero123Condition(context=context, latent=reference.latent.expand(batch, -1, -1, -1))

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Zero123Condition | None
    ) -> torch.Tensor:
        """ε̂ (float32) for novel-view latents ``x_t``; ``None`` is the unconditional (all-zeros) branch."""
        batch = x_t.shape[0]
        if condition is None:
            context_dim = self.unet.config.cross_attention_dim
            context = torch.zeros(batch, 1, context_dim, device=self.device, dtype=self.dtype)
            latent = torch.zeros_like(x_t, device=self.device, dtype=self.dtype)
        else:
            context, latent = condition.context.to(self.dtype), condition.latent.to(self.dtype)
        model_input = torch.cat([x_t.to(self.device, self.dtype), latent], dim=1)
        output = self.unet(model_input, t.to(self.device), encoder_hidden_states=context).sample
        return epsilon_from_prediction(
            output, x_t.to(self.device), t, self.alphas_cumprod, self.prediction_type
        )

    def predict_noise_pair(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Zero123Condition, uncondition: None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_c, ε_u) from one batched UNet call; the unconditional branch is always zeros."""
        if uncondition is not None:
            raise ValueError("Zero-1-to-3's unconditional branch is all zeros; pass uncondition=None")
        batch = x_t.shape[0]
        doubled = Zero123Condition(
            torch.cat([condition.context, torch.zeros_like(condition.context)]),
            torch.cat([condition.latent, torch.zeros_like(condition.latent)]),
        )
        eps = self.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), doubled)
        return eps[:batch], eps[batch:]
