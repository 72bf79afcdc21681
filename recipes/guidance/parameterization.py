"""Forward diffusion and conversions between the ε, v and x₀ parameterizations (DDPM, discrete t)."""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def _coefficients(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """√ᾱ_t and √(1 − ᾱ_t), shaped to broadcast against ``like`` ([B, …])."""
    alpha_bar = alphas_cumprod.to(like.device)[t.to(like.device).long()].to(torch.float32)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return alpha_bar.sqrt().view(shape), (1.0 - alpha_bar).sqrt().view(shape)


def add_noise(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, in the dtype of ``x0``."""
    signal, sigma = _coefficients(alphas_cumprod, t, x0)
    return (signal * x0.float() + sigma * noise.float()).to(x0.dtype)


def velocity(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀."""
    signal, sigma = _coefficients(alphas_cumprod, t, x0)
    return signal * noise.float() - sigma * x0.float()


def epsilon_from_prediction(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Convert a model output in any parameterization to ε̂ (float32)."""
    if prediction_type == "epsilon":
        return model_output.float()
    signal, sigma = _coefficients(alphas_cumprod, t, x_t)
    if prediction_type == "v_prediction":
        return signal * model_output.float() + sigma * x_t.float()
    if prediction_type == "sample":
        return (x_t.float() - signal * model_output.float()) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
