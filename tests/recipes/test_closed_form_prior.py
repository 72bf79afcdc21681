"""The closed-form prior is the exact denoiser of its references, view-conditioned, and drives SDS."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.data.cameras import cameras_from_spherical
from recipes.guidance.closed_form import ClosedFormPrior, scaled_linear_alphas_cumprod, view_directions
from recipes.guidance.denoiser import Denoiser

NUM_REFS = 6
AZIMUTHS = [60.0 * i for i in range(NUM_REFS)]  # one ring at elevation 0


@pytest.fixture
def references() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(NUM_REFS, 3, 8, 8, generator=generator) * 2 - 1


def view(elevation: float, azimuth: float) -> torch.Tensor:
    return torch.tensor([[elevation, azimuth]])


def make_prior(references: torch.Tensor, **kwargs) -> ClosedFormPrior:
    angles = torch.stack([torch.zeros(NUM_REFS), torch.tensor(AZIMUTHS)], dim=1)
    return ClosedFormPrior(references, view_directions(angles), **kwargs)


def noised(prior: ClosedFormPrior, x0: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    alpha_bar = prior.alphas_cumprod[t]
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, noise


def test_schedule_is_stable_diffusions_scaled_linear():
    alphas_cumprod = scaled_linear_alphas_cumprod()
    assert alphas_cumprod.shape == (1000,) and alphas_cumprod.dtype == torch.float32
    assert alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert alphas_cumprod[-1].item() == pytest.approx(0.0046600, abs=2e-6)  # SD's final ᾱ
    assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all())


def test_implements_the_denoiser_protocol(references):
    prior = make_prior(references)
    assert isinstance(prior, Denoiser)
    assert prior.num_train_timesteps == 1000
    assert torch.equal(prior.alphas_cumprod, scaled_linear_alphas_cumprod())
    assert prior.state_dict() == {}  # references are not checkpointed


def direct_posterior_mean(
    references: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, view_log_weights: torch.Tensor
) -> torch.Tensor:
    """E[y | x_t] from the definition, in float64, one reference at a time."""
    log_weights = torch.stack(
        [
            -(x_t.double() - alpha_bar**0.5 * y.double()).square().sum() / (2 * (1 - alpha_bar))
            + view_log_weights[i]
            for i, y in enumerate(references)
        ]
    )
    weights = torch.softmax(log_weights, dim=0)
    return sum(w * y.double() for w, y in zip(weights, references))


@pytest.mark.parametrize("t", [700, 850, 950, 999])
@pytest.mark.parametrize("conditioned", [False, True])
def test_matches_the_posterior_mean_computed_from_its_definition(references, t, conditioned):
    scaled = references * torch.linspace(0.3, 1.0, NUM_REFS).view(-1, 1, 1, 1)  # unequal norms
    prior = make_prior(scaled, sigma_deg=25.0)
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(t))
    query_azimuth = 100.0
    if conditioned:
        angles = torch.tensor([min(abs(a - query_azimuth), 360 - abs(a - query_azimuth)) for a in AZIMUTHS])
        view_log_weights = -angles.double().square() / (2 * 25.0**2)
    else:
        view_log_weights = torch.zeros(NUM_REFS, dtype=torch.float64)
    expected = direct_posterior_mean(scaled, x_t[0], prior.alphas_cumprod[t].item(), view_log_weights)
    x0 = prior.predict_x0(x_t, torch.tensor([t]), view(0, query_azimuth) if conditioned else None)
    torch.testing.assert_close(x0[0].double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("condition", ["none", "own_view"])
def test_small_t_denoises_a_noised_reference_back_to_it(references, condition):
    prior = make_prior(references)
    x_t, _ = noised(prior, references, t=20, seed=1)
    cond = None if condition == "none" else torch.stack([torch.zeros(NUM_REFS), torch.tensor(AZIMUTHS)], 1)
    x0 = prior.predict_x0(x_t, torch.full((NUM_REFS,), 20), cond)
    torch.testing.assert_close(x0, references, atol=1e-5, rtol=0)


def test_large_t_unconditional_estimate_tends_to_the_reference_mean(references):
    prior = make_prior(references)
    mean = references.mean(dim=0)
    spread = (references - mean).flatten(1).norm(dim=1)
    relative_distance, entropy = [], []
    for t in (50, 600, 800, 999):
        x_t, _ = noised(prior, references, t=t, seed=2)
        timesteps = torch.full((NUM_REFS,), t)
        x0 = prior.predict_x0(x_t, timesteps, None)
        weights = prior.mixture_weights(x_t, timesteps, None)
        relative_distance.append(((x0 - mean).flatten(1).norm(dim=1) / spread).mean().item())
        entropy.append(
            (-(weights * weights.clamp_min(1e-30).log()).sum(1)).mean().item() / math.log(NUM_REFS)
        )
    assert relative_distance[0] > 0.99 and entropy[0] < 1e-3  # one-hot: x̂₀ is the reference itself
    assert relative_distance == sorted(relative_distance, reverse=True)
    assert entropy == sorted(entropy)
    assert relative_distance[-1] < 0.35 and entropy[-1] > 0.85


def test_view_conditioning_picks_the_reference_nearest_in_angle(references):
    prior = make_prior(references)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.full((4,), 900)
    queries = torch.tensor([[0.0, 50.0], [10.0, 185.0], [-5.0, 290.0], [0.0, 355.0]])
    weights = prior.mixture_weights(noise, t, queries)
    assert weights.argmax(dim=1).tolist() == [1, 3, 5, 0]
    assert bool((weights.max(dim=1).values > 0.9).all())
    x0 = prior.predict_x0(noise, t, queries)
    torch.testing.assert_close(x0, references[[1, 3, 5, 0]], atol=0.1, rtol=0)
    # Without the view term the same noisy inputs are not routed by camera.
    assert prior.mixture_weights(noise, t, None).argmax(dim=1).tolist() != [1, 3, 5, 0]


def test_cameras_c2w_and_angles_condition_identically(references):
    prior = make_prior(references)
    elevation, azimuth = torch.tensor([12.0, -20.0]), torch.tensor([100.0, 250.0])
    ones = torch.ones(2)
    cameras = cameras_from_spherical(elevation, azimuth, 3 * ones, 40 * ones, 8, 8)
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([700, 950])
    by_angles = prior.mixture_weights(x_t, t, torch.stack([elevation, azimuth], 1))
    torch.testing.assert_close(prior.mixture_weights(x_t, t, cameras), by_angles, atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.mixture_weights(x_t, t, cameras.c2w), by_angles, atol=1e-5, rtol=0)


def test_restriction_keeps_only_references_within_the_angle_and_always_the_nearest(references):
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([500])
    within_70 = make_prior(references, sigma_deg=None, restrict_deg=70.0).mixture_weights(x_t, t, view(0, 40))
    assert within_70[0, [2, 3, 4, 5]].eq(0).all() and within_70[0, [0, 1]].gt(0).all()
    only_nearest = make_prior(references, sigma_deg=None, restrict_deg=1.0).mixture_weights(
        x_t, t, view(0, 40)
    )
    torch.testing.assert_close(only_nearest, torch.eye(NUM_REFS)[[1]])


def test_predict_noise_is_consistent_with_predict_x0(references):
    prior = make_prior(references)
    x_t = torch.randn(NUM_REFS, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 100, 400, 700, 900, 999])
    queries = torch.stack([torch.zeros(NUM_REFS), torch.tensor(AZIMUTHS) + 25], 1)
    eps, x0 = prior.predict_noise(x_t, t, queries), prior.predict_x0(x_t, t, queries)
    alpha_bar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps, x_t, atol=1e-5, rtol=1e-5
    )


def test_predict_noise_recovers_the_true_noise_when_the_posterior_is_certain(references):
    prior = make_prior(references)
    x_t, noise = noised(prior, references, t=100, seed=7)
    eps = prior.predict_noise(x_t, torch.full((NUM_REFS,), 100), None)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)


def test_predict_noise_pair_matches_two_separate_calls(references):
    prior = make_prior(references)
    x_t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([300, 800, 990])
    queries = torch.tensor([[0.0, 10.0], [30.0, 120.0], [-10.0, 200.0]])
    eps_cond, eps_uncond = prior.predict_noise_pair(x_t, t, queries, None)
    torch.testing.assert_close(eps_cond, prior.predict_noise(x_t, t, queries))
    torch.testing.assert_close(eps_uncond, prior.predict_noise(x_t, t, None))
    assert not torch.allclose(eps_cond, eps_uncond)


def run_sds(prior: ClosedFormPrior, x: torch.Tensor, condition, steps: int, seed: int) -> torch.Tensor:
    """Plain SDS: x ← x − lr·w(t)(ε̂(x_t) − ε), w = 1 − ᾱ_t, t ~ U{20, …, 980}."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        t = torch.randint(20, 981, (x.shape[0],), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        alpha_bar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_hat = prior.predict_noise(alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise, t, condition)
        x = x - 0.5 * (1 - alpha_bar) * (eps_hat - noise)
    return x


def test_sds_pulls_an_image_to_the_reference_of_its_view(references):
    prior = make_prior(references)
    start = 0.5 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    distance_before = (start - references[2]).norm()
    result = run_sds(prior, start, view(0, 125), steps=100, seed=10)
    distance = (result - references).flatten(1).norm(dim=1)
    assert distance.argmin().item() == 2
    assert distance[2] < 0.05 * distance_before


def test_view_conditioned_sds_moves_a_wrong_view_to_the_right_one(references):
    """Starting from reference 4 itself, the camera of reference 2 wins at large t and pulls x across."""
    prior = make_prior(references)
    conditioned = run_sds(prior, references[4:5].clone(), view(0, 125), steps=100, seed=11)
    assert (conditioned - references[2]).norm() < 0.05 * (references[4] - references[2]).norm()
    unconditioned = run_sds(prior, references[4:5].clone(), None, steps=100, seed=11)
    assert (unconditioned - references[4]).norm() < (unconditioned - references[2]).norm()


def test_plugs_into_the_shared_sds_loss(references):
    sds = pytest.importorskip("recipes.guidance.sds")
    prior = make_prior(references)
    x = (0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(12))).requires_grad_()
    optimizer = torch.optim.SGD([x], lr=0.5)
    loss_fn = sds.ScoreDistillationSampling(prior, sds.SDSConfig(guidance_scale=1.0))
    condition = torch.tensor([[0.0, 5.0], [0.0, 235.0]])
    target = references[[0, 4]]
    distance_before = (x.detach() - target).flatten(1).norm(dim=1)
    generator = torch.Generator().manual_seed(13)
    for step in range(100):
        optimizer.zero_grad()
        loss_fn(x, condition, None, global_step=step, generator=generator).loss.backward()
        optimizer.step()
    distance = (x.detach() - target).flatten(1).norm(dim=1)
    assert bool((distance < 0.05 * distance_before).all())
