"""ScoreDistillation, the base of SDS, ASD and CSD: its construction, its noised sample and its weighted gradient,
hand-checked through a method whose direction is a fixed tensor (no diffusers involved)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tiny_models import AffineDenoiser

from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation
from recipes.guidance.csd import ClassifierScoreDistillation, CSDConfig
from recipes.guidance.distillation import NoisedSample, ScoreDistillation
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig


@dataclass
class FixedConfig:
    """The shared settings only."""

    timesteps: TimestepSchedule = field(default_factory=lambda: TimestepSchedule(0.3, 0.3))
    weighting: Weighting = "fantasia3d"
    grad_clip: ScalarSchedule | None = None


class FixedDirection(ScoreDistillation[FixedConfig]):
    """A method whose direction is ``condition`` itself; it records what it was given."""

    config_class = FixedConfig

    def direction(self, sample: NoisedSample, condition: Any, uncondition: Any) -> torch.Tensor:
        self.seen = (sample, uncondition, torch.is_grad_enabled())
        return condition


def test_call_noises_then_weights_the_direction_hand_checked() -> None:
    """t = 300 fixed: x_t = √ᾱ·x + √(1 − ᾱ)·ε with ε replayed from the seed, grad = √ᾱ(1 − ᾱ)·d (fantasia3d)."""
    denoiser = AffineDenoiser()
    method = FixedDirection(denoiser)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    d = torch.randn(2, 3, 4, 4)
    out = method(x, d, "uncond", global_step=7, generator=torch.Generator().manual_seed(4))

    replay = torch.Generator().manual_seed(4)
    t = torch.randint(300, 301, (2,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    alpha_bar = denoiser.alphas_cumprod[300]
    sample, uncondition, grad_enabled = method.seen
    assert torch.equal(out.t, t) and torch.equal(sample.t, t) and sample.x is x
    assert torch.equal(sample.noise, noise)
    assert torch.allclose(
        sample.x_t, alpha_bar.sqrt() * x.detach() + (1 - alpha_bar).sqrt() * noise, atol=1e-6
    )
    assert uncondition == "uncond" and not grad_enabled
    expected = alpha_bar.sqrt() * (1 - alpha_bar) * d
    assert torch.allclose(out.grad, expected, atol=1e-6)
    out.loss.backward()
    assert torch.allclose(x.grad, expected / 2, atol=1e-6)


def test_grad_clip_is_the_schedule_at_the_global_step_and_nan_becomes_finite() -> None:
    method = FixedDirection(AffineDenoiser(), FixedConfig(weighting="uniform", grad_clip=[0, 1.0, 0.1, 10]))
    x = torch.zeros(1, 4)
    d = torch.tensor([[5.0, -5.0, 0.05, float("nan")]])
    assert torch.allclose(method(x, d, global_step=0).grad, torch.tensor([[1.0, -1.0, 0.05, 0.0]]))
    assert torch.allclose(method(x, d, global_step=10).grad, torch.tensor([[0.1, -0.1, 0.05, 0.0]]))


@pytest.mark.parametrize(
    ("method", "config"),
    [
        (ScoreDistillationSampling, SDSConfig),
        (AsynchronousScoreDistillation, ASDConfig),
        (ClassifierScoreDistillation, CSDConfig),
        (FixedDirection, FixedConfig),
    ],
)
def test_each_method_defaults_to_its_own_config_and_keeps_a_given_one(method: Any, config: Any) -> None:
    denoiser = AffineDenoiser()
    assert method(denoiser).config == config() and method(denoiser).config is not method(denoiser).config
    given = config(weighting="uniform")
    built = method(denoiser, given)
    assert built.config is given and built.denoiser is denoiser


def test_a_method_without_direction_cannot_be_built() -> None:
    class NoDirection(ScoreDistillation[FixedConfig]):
        config_class = FixedConfig

    with pytest.raises(TypeError, match="direction"):
        NoDirection(AffineDenoiser())  # type: ignore[abstract]
