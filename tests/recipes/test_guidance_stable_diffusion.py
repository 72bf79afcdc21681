"""Stable Diffusion guidance through the real loading path: a tiny random checkpoint saved in the hub
layout and loaded with ``from_pretrained`` under ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sd_folder  # noqa: F401  (module-scoped fixture)

from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation
from recipes.guidance.cfg import predict_guided_noise
from recipes.guidance.loading import GuidanceModelNotFoundError
from recipes.guidance.prompts import PretrainedTextEncoding, PromptConfig, PromptEmbeddings
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionDenoiser


@pytest.fixture(scope="module")
def sd(tiny_sd_folder: Path) -> StableDiffusionDenoiser:  # noqa: F811
    return StableDiffusionDenoiser.from_pretrained(
        StableDiffusionConfig(str(tiny_sd_folder), image_resolution=16), device="cpu"
    )


@pytest.fixture(scope="module")
def prompts(sd: StableDiffusionDenoiser, tmp_path_factory: pytest.TempPathFactory) -> PromptEmbeddings:
    config = PromptConfig(
        prompt="a cat", negative_prompt="blurry", cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    return PromptEmbeddings.compute(config, sd.text_encoding())


def test_loads_fp32_on_cpu_with_the_checkpoint_schedule(sd: StableDiffusionDenoiser) -> None:
    from diffusers import DDPMScheduler

    assert sd.dtype == torch.float32 and sd.num_train_timesteps == 1000
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(sd.alphas_cumprod, reference.alphas_cumprod)


class _FailingEncoding:
    def __init__(self, cache_key: str) -> None:
        self.cache_key = cache_key

    def load(self):
        raise AssertionError("the text encoder must not be loaded when every embedding is cached")


def test_prompt_embeddings_are_cached_per_model_and_text(
    sd: StableDiffusionDenoiser, prompts: PromptEmbeddings
) -> None:
    encode = sd.text_encoding().load()
    expected = encode(["a cat", "blurry", "a cat, front view"])
    assert torch.allclose(prompts.view_independent[0], expected[0])
    assert torch.allclose(prompts.negative[0], expected[1])
    assert torch.allclose(prompts.directional[1], expected[2])
    assert not torch.allclose(expected[0], expected[2])

    again = PromptEmbeddings.compute(prompts.config, _FailingEncoding(sd.text_encoding().cache_key))
    assert torch.equal(again.directional, prompts.directional)
    with pytest.raises(AssertionError, match="must not be loaded"):  # another model is another cache entry
        PromptEmbeddings.compute(prompts.config, _FailingEncoding("clip:some/other-model"))


def test_view_dependent_prompt_thresholds(prompts: PromptEmbeddings) -> None:
    elevation = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 70.0, 59.0])
    azimuth = torch.tensor([0.0, 44.0, 46.0, 136.0, -170.0, 180.0, 400.0])  # 400° wraps to 40°
    index = prompts.direction_index(elevation, azimuth).tolist()
    assert index == [1, 1, 0, 2, 2, 3, 1]  # front, front, side, back, back, overhead, front
    condition, uncondition = prompts.for_views(elevation, azimuth)
    assert torch.equal(condition[3], prompts.directional[2]) and torch.equal(
        uncondition[0], prompts.negative[0]
    )
    wide = PromptEmbeddings(
        PromptConfig(front_threshold=30, back_threshold=30),
        prompts.view_independent,
        prompts.directional,
        prompts.negative,
    )
    assert wide.direction_index(torch.zeros(2), torch.tensor([40.0, 140.0])).tolist() == [0, 0]


def test_cfg_scale_one_is_the_conditional_unet_prediction(
    sd: StableDiffusionDenoiser, prompts: PromptEmbeddings
) -> None:
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond, uncond = prompts.for_views(torch.zeros(2), torch.zeros(2))
    with torch.no_grad():
        direct = sd.unet(x_t, t, encoder_hidden_states=cond).sample
        direct_uncond = sd.unet(x_t, t, encoder_hidden_states=uncond).sample
        guided_one = predict_guided_noise(sd, x_t, t, cond, uncond, 1.0).guided
        guided = predict_guided_noise(sd, x_t, t, cond, uncond, 7.5).guided
    assert torch.equal(guided_one, direct)
    assert torch.allclose(guided, direct_uncond + 7.5 * (direct - direct_uncond), atol=1e-4)


def test_perp_neg_on_the_unet_matches_its_formula(
    sd: StableDiffusionDenoiser, prompts: PromptEmbeddings
) -> None:
    from dataclasses import replace

    from recipes.guidance.cfg import PerpNegCondition, perpendicular_component

    perp = PromptEmbeddings(
        replace(prompts.config, perp_neg=True),
        prompts.view_independent,
        prompts.directional,
        prompts.negative,
    )
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    condition, uncond = perp.for_views(torch.zeros(2), torch.tensor([30.0, 150.0]))
    assert isinstance(condition, PerpNegCondition)
    with torch.no_grad():
        guided = predict_guided_noise(sd, x_t, t, condition, uncond, 7.5).guided

        def unet(text):
            return sd.unet(x_t, t, encoder_hidden_states=text).sample

        e_u = unet(uncond)
        e_pos = unet(condition.positive) - e_u
        total = e_pos
        for i, negative in enumerate(condition.negatives):
            total = total + condition.weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(
                unet(negative) - e_u, e_pos
            )
    assert (condition.weights < 0).all()
    assert torch.allclose(guided, e_u + 7.5 * total, atol=1e-4)


def test_sds_through_the_vae_matches_weighted_residual(
    sd: StableDiffusionDenoiser, prompts: PromptEmbeddings
) -> None:
    rgb = torch.rand(2, 3, 12, 12, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    latents = sd.encode_images(rgb, generator)
    assert latents.shape == (2, 4, 8, 8)
    cond, uncond = prompts.for_views(torch.zeros(2), torch.tensor([0.0, 90.0]))
    config = SDSConfig(guidance_scale=5.0, timesteps=TimestepSchedule(0.3, 0.3), weighting="sds")
    out = ScoreDistillationSampling(sd, config)(
        latents, cond, uncond, generator=torch.Generator().manual_seed(1)
    )

    replay = torch.Generator().manual_seed(1)
    t = torch.randint(300, 301, (2,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    alpha_bar = sd.alphas_cumprod[300]
    x_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_c = sd.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = sd.unet(x_t, t, encoder_hidden_states=uncond).sample
    expected = (1 - alpha_bar) * (eps_u + 5.0 * (eps_c - eps_u) - noise)
    assert torch.allclose(out.grad, expected, atol=1e-4)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.unet.parameters())


def test_asd_with_zero_shift_is_the_classifier_score_on_sd(
    sd: StableDiffusionDenoiser, prompts: PromptEmbeddings
) -> None:
    latents = torch.randn(2, 4, 8, 8)
    cond, uncond = prompts.for_views(torch.zeros(2), torch.zeros(2))
    asd = AsynchronousScoreDistillation(sd, ASDConfig(guidance_scale=7.5, shift_ratio=0.0))
    out = asd(latents, cond, uncond, generator=torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    t = torch.randint(20, 981, (2,), generator=replay)
    asd.shifted_timesteps(t, 0, replay)
    noise = torch.randn(latents.shape, generator=replay)
    alpha_bar = sd.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_c = sd.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = sd.unet(x_t, t, encoder_hidden_states=uncond).sample
    assert torch.allclose(out.grad, (1 - alpha_bar) * 6.5 * (eps_c - eps_u), atol=1e-4)


def test_missing_model_error_says_which_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(GuidanceModelNotFoundError) as error:
        StableDiffusionDenoiser.from_pretrained(
            StableDiffusionConfig("stabilityai/stable-diffusion-2-1-base"), "cpu"
        )
    message = str(error.value)
    assert "stabilityai/stable-diffusion-2-1-base" in message
    assert "hf download stabilityai/stable-diffusion-2-1-base" in message
    assert "guidance.model.pretrained_model_name_or_path" in message
    with pytest.raises(GuidanceModelNotFoundError, match="hf download no-such/text-model"):
        PretrainedTextEncoding("no-such/text-model", "clip").load()
    with pytest.raises(GuidanceModelNotFoundError, match="does not exist"):
        StableDiffusionDenoiser.from_pretrained(StableDiffusionConfig(str(tmp_path / "nowhere")), "cpu")
