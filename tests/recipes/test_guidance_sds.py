"""SDS, ASD, CFG and the timestep schedules on an analytic denoiser (no diffusers involved)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import AffineDenoiser

from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation
from recipes.guidance.cfg import classifier_free_guidance, predict_guided_noise
from recipes.guidance.schedules import TimestepSchedule, scalar_at, timestep_weight
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig


def test_scalar_schedule_threestudio_syntax() -> None:
    assert scalar_at(0.3, 123) == 0.3
    assert scalar_at([0, 0.98, 0.5, 100], 0) == pytest.approx(0.98)
    assert scalar_at([0, 0.98, 0.5, 100], 50) == pytest.approx(0.74)
    assert scalar_at([0, 0.98, 0.5, 100], 1000) == pytest.approx(0.5)
    step_change = [5000, 0.98, 0.5, 5001]
    assert (scalar_at(step_change, 4999), scalar_at(step_change, 5001)) == (0.98, 0.5)


def test_timestep_range_anneals_and_samples_inside_it() -> None:
    schedule = TimestepSchedule(min_step_percent=[0, 0.5, 0.02, 100], max_step_percent=[0, 0.98, 0.5, 100])
    assert schedule.range_at(0, 1000) == (500, 980)
    assert schedule.range_at(100, 1000) == (20, 500)
    t = schedule.sample(4096, 100, 1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 500
    assert t.min() <= 25 and t.max() >= 495


def test_deterministic_timestep_decay_dreamgaussian_style() -> None:
    schedule = TimestepSchedule(0.02, 0.98, deterministic_over_steps=500)
    device = torch.device("cpu")
    assert schedule.sample(3, 0, 1000, device).tolist() == [980, 980, 980]
    assert schedule.sample(2, 250, 1000, device).tolist() == [500, 500]
    assert schedule.sample(1, 500, 1000, device).tolist() == [20]


def test_weightings_match_their_formulas() -> None:
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1])
    t = torch.tensor([0, 1, 2])
    assert torch.allclose(timestep_weight("sds", alphas_cumprod, t), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(timestep_weight("uniform", alphas_cumprod, t), torch.ones(3))
    expected = torch.tensor([0.9**0.5 * 0.1, 0.5**0.5 * 0.5, 0.1**0.5 * 0.9])
    assert torch.allclose(timestep_weight("fantasia3d", alphas_cumprod, t), expected)


def test_cfg_is_diffusers_convention_and_scale_one_is_the_conditional_prediction() -> None:
    eps_u, eps_c = torch.tensor([1.0]), torch.tensor([3.0])
    assert classifier_free_guidance(eps_u, eps_c, 7.5).item() == pytest.approx(1.0 + 7.5 * 2.0)
    denoiser = AffineDenoiser()
    x_t, t, cond = torch.randn(2, 3), torch.tensor([10, 20]), torch.randn(2, 3)
    guided = predict_guided_noise(denoiser, x_t, t, cond, None, guidance_scale=1.0)
    assert torch.equal(guided.guided, denoiser.predict_noise(x_t, t, cond))
    assert guided.uncond is None


def test_sds_gradient_is_weighted_noise_residual_hand_checked() -> None:
    """Fixed t = 500: grad = (1 − ᾱ_500)·(ε̂_CFG(x_t) − ε) with ε replayed from the same seed."""
    denoiser = AffineDenoiser(a=0.5, b=1.0)
    config = SDSConfig(guidance_scale=3.0, timesteps=TimestepSchedule(0.5, 0.5), weighting="sds")
    sds = ScoreDistillationSampling(denoiser, config)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    cond = torch.randn(2, 4, 3, 3)
    out = sds(x, cond, None, generator=torch.Generator().manual_seed(7))

    replay = torch.Generator().manual_seed(7)
    t = torch.randint(500, 501, (2,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    alpha_bar = denoiser.alphas_cumprod[500]
    x_t = alpha_bar.sqrt() * x.detach() + (1 - alpha_bar).sqrt() * noise
    eps_hat = 0.5 * x_t + 3.0 * cond  # ε_u + 3(ε_c − ε_u) with ε_u = 0.5 x_t, ε_c = 0.5 x_t + c
    expected = (1 - alpha_bar) * (eps_hat - noise)
    assert torch.equal(out.t, t)
    assert torch.allclose(out.grad, expected, atol=1e-6)
    out.loss.backward()
    assert torch.allclose(x.grad, expected / 2, atol=1e-6)


def test_sds_randomness_comes_from_the_generator_or_the_global_rng() -> None:
    sds = ScoreDistillationSampling(AffineDenoiser(), SDSConfig(guidance_scale=7.5, grad_clip=0.01))
    x, cond = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    a = sds(x, cond, generator=torch.Generator().manual_seed(1))
    b = sds(x, cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.grad, b.grad) and torch.equal(a.t, b.t)
    assert a.grad.abs().max() <= 0.01
    torch.manual_seed(5)
    c = sds(x, cond)
    torch.manual_seed(5)
    d = sds(x, cond)
    assert torch.equal(c.grad, d.grad)
    assert not torch.equal(a.grad, c.grad)


def test_asd_with_zero_shift_is_the_weighted_classifier_score() -> None:
    denoiser = AffineDenoiser(a=0.5, b=1.0)
    scale = 7.5
    asd = AsynchronousScoreDistillation(denoiser, ASDConfig(guidance_scale=scale, shift_ratio=0.0))
    x, cond = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    out = asd(x, cond, None, generator=torch.Generator().manual_seed(3))
    # ε_c − ε_u = (0.5·x_t + c) − 0.5·x_t = c, whatever t and the noise were
    weight = (1 - denoiser.alphas_cumprod[out.t]).view(-1, 1, 1, 1)
    assert torch.allclose(out.grad, weight * (scale - 1) * cond, atol=1e-5)


def test_asd_shift_is_bounded_by_eta_times_distance_to_t_min() -> None:
    asd = AsynchronousScoreDistillation(
        AffineDenoiser(), ASDConfig(shift_ratio=0.1, timesteps=TimestepSchedule(0.02, 0.98))
    )
    t = torch.arange(20, 981)
    shifted = asd.shifted_timesteps(t, 0, torch.Generator().manual_seed(0))
    shift = shifted - t
    assert (shift >= 0).all() and (shift <= (0.1 * (t - 20)).floor()).all()
    assert shift.float().mean() > 10  # random in [0, η(t − T_min)], not stuck at 0
    deterministic = AsynchronousScoreDistillation(AffineDenoiser(), ASDConfig(random_shift=False))
    assert deterministic.shifted_timesteps(torch.tensor([520]), 0).item() == 520 + 50


def test_asd_shares_one_noise_between_both_terms() -> None:
    """With a = 0 the prediction ignores x_t, so the gradient cannot see the noise unless it is shared."""
    denoiser = AffineDenoiser(a=1.0, b=0.0)
    asd = AsynchronousScoreDistillation(denoiser, ASDConfig(guidance_scale=1.0, shift_ratio=0.5))
    x = torch.randn(2, 3, 4, 4)
    out = asd(x, None, None, generator=torch.Generator().manual_seed(0))
    # ε̂ = x_t: grad = w(t)·(x_t − x_{t+Δt}) = w(t)·((√ᾱ_t − √ᾱ_s)·x + (σ_t − σ_s)·ε) for the same ε
    replay = torch.Generator().manual_seed(0)
    t = torch.randint(20, 981, (2,), generator=replay)
    shifted = asd.shifted_timesteps(t, 0, replay)
    noise = torch.randn(x.shape, generator=replay)
    ab = denoiser.alphas_cumprod
    view = (-1, 1, 1, 1)
    x_t = ab[t].sqrt().view(view) * x + (1 - ab[t]).sqrt().view(view) * noise
    x_s = ab[shifted].sqrt().view(view) * x + (1 - ab[shifted]).sqrt().view(view) * noise
    assert torch.allclose(out.grad, (1 - ab[t]).view(view) * (x_t - x_s), atol=1e-6)


def test_package_import_pulls_in_no_diffusion_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, recipes.guidance, recipes.guidance.denoiser;"
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
