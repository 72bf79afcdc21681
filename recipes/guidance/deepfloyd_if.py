"""DeepFloyd IF stage I as a pixel-space :class:`Denoiser` (64×64 RGB, T5 text encoder).

Renders are resized (bilinear) to 64×64 and mapped to [−1, 1]; the UNet's six output channels are ε and
the learned variance, of which ε is used. The T5-XXL text encoder is loaded only to fill the prompt
cache (:meth:`DeepFloydIFDenoiser.text_encoding`); it needs about 10 GB in fp16, so compute the
embeddings once and they are reused from disk afterwards.
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

DEFAULT_DEEPFLOYD_IF = "DeepFloyd/IF-I-XL-v1.0"


@dataclass
class DeepFloydIFConfig:
    """Which IF stage-I checkpoint to distill and how to run it.

    Attributes:
        pretrained_model_name_or_path: hub id (gated: accept the license, then ``hf auth login``) or local folder.
        torch_dtype: ``auto`` = float16 on GPU, float32 on CPU.
        variant: weight file variant to load (``"fp16"`` halves the download of the hub checkpoint).
        image_resolution: the UNet's pixel resolution (64 for stage I).
    """

    pretrained_model_name_or_path: str = DEFAULT_DEEPFLOYD_IF
    torch_dtype: TorchDType = "auto"
    variant: str | None = None
    image_resolution: int = 64


class DeepFloydIFDenoiser(TextConditionedUNetDenoiser):
    """IF stage I's pixel UNet as an ε-predictor; ``condition`` is a T5 embedding tensor [B or 1, 77, D]."""

    CONFIG_HINT = "guidance.model.pretrained_model_name_or_path"

    def __init__(
        self,
        unet: Any,
        alphas_cumprod: torch.Tensor,
        prediction_type: PredictionType,
        config: DeepFloydIFConfig,
    ) -> None:
        super().__init__(unet, alphas_cumprod, prediction_type)
        self.config = config

    @classmethod
    def from_pretrained(
        cls, config: DeepFloydIFConfig | None = None, device: torch.device | str | None = None
    ) -> DeepFloydIFDenoiser:
        """Load the UNet and schedule from a hub id or local folder (fp16 on GPU, fp32 on CPU by default)."""
        from diffusers import UNet2DConditionModel

        config = config or DeepFloydIFConfig()
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(config.torch_dtype, device)
        path = config.pretrained_model_name_or_path
        alphas_cumprod, _, prediction_type = load_noise_schedule(path, cls.CONFIG_HINT)
        variant = {"variant": config.variant} if config.variant else {}
        unet = load_pretrained(
            UNet2DConditionModel, path, "unet", config_hint=cls.CONFIG_HINT, torch_dtype=dtype, **variant
        )
        return cls(unet.to(device), alphas_cumprod, prediction_type, config)

    def text_encoding(self) -> PretrainedTextEncoding:
        """The matching T5 encoder, for :meth:`PromptEmbeddings.compute`."""
        return PretrainedTextEncoding(
            self.config.pretrained_model_name_or_path,
            "t5",
            self.config.torch_dtype,
            self.CONFIG_HINT,
            self.config.variant,
        )

    def encode_images(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Differentiable map of renders ``rgb`` [B, 3, H, W] in [0, 1] to IF's input space [B, 3, 64, 64] in [−1, 1].

        ``generator`` is unused (the map is deterministic); it is accepted for symmetry with Stable Diffusion.
        """
        size = self.config.image_resolution
        return F.interpolate(rgb.float(), (size, size), mode="bilinear", align_corners=False) * 2.0 - 1.0

    def decode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model space back to images in [0, 1] (for logging)."""
        return (x.float() * 0.5 + 0.5).clamp(0.0, 1.0)
