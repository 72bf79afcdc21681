"""The part Stable Diffusion and DeepFloyd IF share: a frozen, text-conditioned diffusers UNet as a
:class:`Denoiser`. Deliberately not an ``nn.Module``: its weights must stay out of the LightningModule's
parameters, optimizer, checkpoints and the Picard state."""

from __future__ import annotations

from typing import Any

import torch

from recipes.guidance.parameterization import PredictionType, epsilon_from_prediction


class TextConditionedUNetDenoiser:
    """A text-conditioned UNet seen as an ε-predictor.

    ``condition`` for :meth:`predict_noise` is a text-embedding tensor [B or 1, L, D] (from
    :class:`~recipes.guidance.prompts.PromptEmbeddings`). The unconditional branch is the embedding of the
    negative (or empty) prompt, so ``None`` is not accepted. Extra output channels (IF's learned
    variance) are dropped.
    """

    def __init__(self, unet: Any, alphas_cumprod: torch.Tensor, prediction_type: PredictionType) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod.to(self.device)
        self.num_train_timesteps = len(alphas_cumprod)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: torch.device | str) -> TextConditionedUNetDenoiser:
        """Move the model (in place) and return it."""
        self.unet.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """ε̂ (float32) for noisy inputs ``x_t`` and text embeddings ``condition``."""
        if condition is None:
            raise ValueError(
                "the unconditional branch is the negative-prompt embedding; pass it as the condition"
            )
        text = condition.to(self.device, self.dtype).expand(x_t.shape[0], -1, -1)
        output = self.unet(
            x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=text
        ).sample
        output = output[:, : x_t.shape[1]]
        return epsilon_from_prediction(
            output, x_t.to(self.device), t, self.alphas_cumprod, self.prediction_type
        )

    def predict_noise_pair(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Any, uncondition: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_c, ε_u) from one batched UNet call."""
        batch = x_t.shape[0]
        text = torch.cat([condition.expand(batch, -1, -1), uncondition.expand(batch, -1, -1)])
        eps = self.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), text)
        return eps[:batch], eps[batch:]
