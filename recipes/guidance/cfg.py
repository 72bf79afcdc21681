"""Classifier-free guidance, in the one convention this package uses: diffusers'.

    ε̂ = ε_u + s·(ε_c − ε_u)

s = 1 is the plain conditional prediction, s = 0 the unconditional one. threestudio's
``stable-diffusion-guidance`` and ``deep-floyd-guidance`` use ε_c + s·(ε_c − ε_u) instead, so their
scales 100 (SD) and 20 (IF) are 101 and 21 here; its VSD and Zero-1-to-3 guidance, DreamGaussian and
ScaleDreamer already use this convention and port unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recipes.guidance.denoiser import Denoiser


def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@dataclass
class GuidedNoise:
    """A guided prediction and the two predictions it came from (``uncond`` is None when s = 1)."""

    guided: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None


def predict_guided_noise(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    condition: Any,
    uncondition: Any,
    guidance_scale: float,
) -> GuidedNoise:
    """Run the denoiser with and without the condition and combine with CFG.

    With s = 1 the unconditional pass is skipped and the result *is* the conditional prediction.
    Denoisers that can evaluate both conditions in one batched call may provide
    ``predict_noise_pair(x_t, t, condition, uncondition) -> (ε_c, ε_u)``; it is used when present.
    """
    if guidance_scale == 1.0:
        eps_cond = denoiser.predict_noise(x_t, t, condition)
        return GuidedNoise(guided=eps_cond, cond=eps_cond, uncond=None)
    predict_pair = getattr(denoiser, "predict_noise_pair", None)
    if predict_pair is not None:
        eps_cond, eps_uncond = predict_pair(x_t, t, condition, uncondition)
    else:
        eps_cond = denoiser.predict_noise(x_t, t, condition)
        eps_uncond = denoiser.predict_noise(x_t, t, uncondition)
    return GuidedNoise(classifier_free_guidance(eps_uncond, eps_cond, guidance_scale), eps_cond, eps_uncond)
