"""The one interface every score-distillation loss talks to: a noise predictor with its schedule.

SDS, VSD and ASD only need ε̂(x_t, t, condition) and the training schedule ᾱ_t. Stable Diffusion,
DeepFloyd IF, Zero-1-to-3 and the weight-free closed-form prior all implement this protocol, so any
loss runs on any of them unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion model seen as a noise predictor on its own (latent or pixel) space.

    Attributes:
        alphas_cumprod: ᾱ_t for t = 0 … num_train_timesteps − 1, float32, on the model's device.
        num_train_timesteps: length of the training schedule (1000 for SD and IF).
    """

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """Return ε̂ (same shape as ``x_t``) for noisy inputs ``x_t`` at integer timesteps ``t`` (shape ``[B]``).

        ``condition`` is whatever the model conditions on (text embeddings, a camera, a reference image);
        ``None`` means unconditional. Models that predict v or x₀ convert to ε here.
        """
        ...
