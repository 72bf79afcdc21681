"""Classifier-free guidance, in the one convention this package uses: diffusers'.

    ε̂ = ε_u + s·(ε_c − ε_u)

s = 1 is the plain conditional prediction, s = 0 the unconditional one. threestudio's
``stable-diffusion-guidance`` and ``deep-floyd-guidance`` use ε_c + s·(ε_c − ε_u) instead, so their
scales 100 (SD) and 20 (IF) are 101 and 21 here; its VSD and Zero-1-to-3 guidance, DreamGaussian and
ScaleDreamer already use this convention and port unchanged.

Perp-Neg (Armandpour et al. 2023, threestudio's ``use_perp_neg``) replaces ε_c − ε_u by
e_pos + Σ_i w_i·perp(ε_i − ε_u, e_pos), e_pos = ε_pos − ε_u, where perp(a, b) is the component of a
orthogonal to b (per batch element) and the weights w_i are negative to push away from the negative
prompts' directions: only the part of a negative prompt that the positive one does not share is
removed. Pass a :class:`PerpNegCondition` as the condition to use it; with all w_i = 0 it is plain CFG.
"""

from __future__ import annotations

from collections.abc import Sequence
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
class PerpNegCondition:
    """A Perp-Neg condition: the positive condition, K negative ones and their weights.

    Attributes:
        positive: the condition of ε_pos (e.g. text embeddings ``[B, L, D]``).
        negatives: K conditions batched like ``positive``.
        weights: ``[B, K]`` weight of each negative per batch element (negative numbers push away).
    """

    positive: Any
    negatives: Sequence[Any]
    weights: torch.Tensor


def positive_condition(condition: Any) -> Any:
    """The plain condition: ``condition.positive`` for a :class:`PerpNegCondition`, else ``condition``."""
    return condition.positive if isinstance(condition, PerpNegCondition) else condition


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The component of ``x`` orthogonal to ``y``, per batch element (first dimension):
    x − (⟨x, y⟩ / max(⟨y, y⟩, 1e-6))·y."""
    dims = tuple(range(1, x.dim()))
    scale = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - scale * y


def perp_neg_guidance(
    eps_uncond: torch.Tensor,
    eps_positive: torch.Tensor,
    eps_negatives: Sequence[torch.Tensor],
    weights: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """ε_u + s·(e_pos + Σ_i w_i·perp(ε_i − ε_u, e_pos)) with e_pos = ε_pos − ε_u; ``weights [B, K]``."""
    e_pos = eps_positive - eps_uncond
    combined = e_pos
    for i, eps_negative in enumerate(eps_negatives):
        weight = weights[:, i].to(e_pos).view(-1, *([1] * (e_pos.dim() - 1)))
        combined = combined + weight * perpendicular_component(eps_negative - eps_uncond, e_pos)
    return eps_uncond + guidance_scale * combined


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

    A :class:`PerpNegCondition` gives the Perp-Neg combination (``cond`` is then ε_pos); a negative
    whose weight is 0 for the whole batch is not evaluated.
    """
    perp_neg = condition if isinstance(condition, PerpNegCondition) else None
    if perp_neg is not None:
        condition = perp_neg.positive
    if guidance_scale == 1.0 and perp_neg is None:
        eps_cond = denoiser.predict_noise(x_t, t, condition)
        return GuidedNoise(guided=eps_cond, cond=eps_cond, uncond=None)
    predict_pair = getattr(denoiser, "predict_noise_pair", None)
    if predict_pair is not None:
        eps_cond, eps_uncond = predict_pair(x_t, t, condition, uncondition)
    else:
        eps_cond = denoiser.predict_noise(x_t, t, condition)
        eps_uncond = denoiser.predict_noise(x_t, t, uncondition)
    if perp_neg is not None:
        used = [i for i in range(len(perp_neg.negatives)) if bool((perp_neg.weights[:, i] != 0).any())]
        eps_negatives = [denoiser.predict_noise(x_t, t, perp_neg.negatives[i]) for i in used]
        guided = perp_neg_guidance(
            eps_uncond, eps_cond, eps_negatives, perp_neg.weights[:, used], guidance_scale
        )
        return GuidedNoise(guided, eps_cond, eps_uncond)
    return GuidedNoise(classifier_free_guidance(eps_uncond, eps_cond, guidance_scale), eps_cond, eps_uncond)
