"""Classifier Score Distillation on closed-form denoisers, its relation to SDS, and its selection by config."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from test_recipe_cli import fit
from tiny_models import AffineDenoiser

from recipes.guidance.cfg import PerpNegCondition, perp_neg_guidance
from recipes.guidance.csd import ClassifierScoreDistillation, CSDConfig
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.system.distillation import DistillationConfig


class GatedDenoiser(AffineDenoiser):
    """ε̂(x_t, t, c) = a·x_t + c·x_t² (c = 0 when unconditional): the classifier score c·x_t² depends on the noise."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        c = torch.zeros_like(x_t) if condition is None else condition
        return self.a * x_t + c * x_t.square()


def _replay(seed: int, shape: tuple[int, ...], denoiser: AffineDenoiser, low: int, high: int):
    """The t, noise and x_t a loss draws from ``torch.Generator().manual_seed(seed)`` (same order as the losses)."""
    replay = torch.Generator().manual_seed(seed)
    t = torch.randint(low, high + 1, (shape[0],), generator=replay)
    noise = torch.randn(shape, generator=replay)
    alpha_bar = denoiser.alphas_cumprod[t].view(-1, *([1] * (len(shape) - 1)))
    return t, noise, alpha_bar


def test_csd_gradient_is_omega_times_weighted_classifier_score_hand_checked() -> None:
    denoiser = GatedDenoiser(a=0.5)
    config = CSDConfig(guidance_scale=40.0, timesteps=TimestepSchedule(0.2, 0.6), weighting="sds")
    csd = ClassifierScoreDistillation(denoiser, config)
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = csd(x, cond, uncond, generator=torch.Generator().manual_seed(11))

    t, noise, alpha_bar = _replay(11, tuple(x.shape), denoiser, 200, 600)
    x_t = alpha_bar.sqrt() * x.detach() + (1 - alpha_bar).sqrt() * noise
    expected = 40.0 * (1 - alpha_bar) * ((cond - uncond) * x_t.square())  # ω·w(t)·(ε_c − ε_u)
    assert torch.equal(out.t, t)
    assert torch.allclose(out.grad, expected, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert torch.allclose(x.grad, expected / 3, rtol=1e-4, atol=1e-5)


def test_csd_at_scale_one_and_zero() -> None:
    denoiser = AffineDenoiser(a=0.5, b=2.0)
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    one = ClassifierScoreDistillation(denoiser, CSDConfig(guidance_scale=1.0, weighting="uniform"))
    assert torch.allclose(
        one(x, cond, None, generator=torch.Generator().manual_seed(0)).grad, 2.0 * cond, atol=1e-5
    )
    zero = ClassifierScoreDistillation(denoiser, CSDConfig(guidance_scale=0.0))
    assert torch.equal(
        zero(x, cond, None, generator=torch.Generator().manual_seed(0)).grad, torch.zeros_like(x)
    )


def test_csd_is_zero_whatever_the_noise_when_the_condition_is_the_uncondition() -> None:
    csd = ClassifierScoreDistillation(GatedDenoiser(a=0.5), CSDConfig(guidance_scale=7.5))
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grads = [csd(x, cond, cond.clone(), generator=torch.Generator().manual_seed(s)).grad for s in (0, 1)]
    assert all(torch.equal(g, torch.zeros_like(x)) for g in grads)
    different = [csd(x, cond, None, generator=torch.Generator().manual_seed(s)).grad for s in (0, 1)]
    assert not torch.allclose(different[0], different[1])  # with c ≠ u it does depend on the noise here


def test_sds_minus_csd_is_the_weighted_unconditional_denoising_residual() -> None:
    """Same seed, ω = s: SDS − CSD = w(t)·(ε_u(x_t) − ε)."""
    denoiser = AffineDenoiser(a=0.5, b=1.0)
    schedule = TimestepSchedule(0.02, 0.98)
    sds = ScoreDistillationSampling(denoiser, SDSConfig(guidance_scale=7.5, timesteps=schedule))
    csd = ClassifierScoreDistillation(denoiser, CSDConfig(guidance_scale=7.5, timesteps=schedule))
    x, cond = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    a = sds(x, cond, None, generator=torch.Generator().manual_seed(5))
    b = csd(x, cond, None, generator=torch.Generator().manual_seed(5))
    t, noise, alpha_bar = _replay(5, tuple(x.shape), denoiser, 20, 980)
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    assert torch.equal(a.t, t) and torch.equal(b.t, t)
    assert torch.allclose(a.grad - b.grad, (1 - alpha_bar) * (0.5 * x_t - noise), atol=1e-4)


def test_csd_uses_the_perp_neg_direction() -> None:
    denoiser = AffineDenoiser(a=0.5, b=1.0)
    csd = ClassifierScoreDistillation(
        denoiser, CSDConfig(guidance_scale=3.0, timesteps=TimestepSchedule(0.5, 0.5), weighting="uniform")
    )
    x = torch.randn(2, 3, 2, 2)
    positive, negative = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    weights = torch.tensor([[-1.0], [-0.5]])
    out = csd(
        x, PerpNegCondition(positive, [negative], weights), None, generator=torch.Generator().manual_seed(0)
    )
    zeros = torch.zeros_like(x)  # ε_u = a·x_t cancels: the direction only sees b·c
    expected = perp_neg_guidance(zeros, positive, [negative], weights, 3.0)
    assert torch.allclose(out.grad, expected, atol=1e-5)


def test_the_distillation_config_selects_csd_through_the_command_line(tmp_path) -> None:
    assert DistillationConfig(method="csd").csd.guidance_scale == 7.5
    run_dir = fit("asd", tmp_path / "csd", "--model.distillation.method=csd", "--trainer.max_steps=2")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_csd" in header and "train/loss_asd" not in header
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 2


@pytest.mark.parametrize("scale", [2.0, 7.5])
def test_csd_equals_asd_without_shift_at_omega_s_minus_one(scale: float) -> None:
    """On an affine denoiser ε_c − ε_u does not depend on x_t, so ASD's own noise draws do not matter."""
    from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation

    denoiser = AffineDenoiser(a=0.5, b=1.0)
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    asd = AsynchronousScoreDistillation(denoiser, ASDConfig(guidance_scale=scale, shift_ratio=0.0))
    csd = ClassifierScoreDistillation(denoiser, CSDConfig(guidance_scale=scale - 1.0))
    a = asd(x, cond, None, generator=torch.Generator().manual_seed(2))
    b = csd(x, cond, None, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.t, b.t)
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
