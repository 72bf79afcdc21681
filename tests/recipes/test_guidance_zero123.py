"""Zero-1-to-3 guidance loaded from the diffusers folder layout (tiny random parts), and reference-view losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_zero123_folder  # noqa: F401  (module-scoped fixture)

from recipes.guidance.loading import GuidanceModelNotFoundError
from recipes.guidance.reference_view import reference_view_losses
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.guidance.zero123 import Zero123Config, Zero123Denoiser


@pytest.fixture(scope="module")
def zero123(tiny_zero123_folder: Path) -> Zero123Denoiser:  # noqa: F811
    return Zero123Denoiser.from_pretrained(
        Zero123Config(str(tiny_zero123_folder), image_resolution=16), "cpu"
    )


def test_condition_projects_clip_embedding_with_the_camera_delta(zero123: Zero123Denoiser) -> None:
    reference = zero123.encode_reference(torch.rand(1, 3, 40, 40))
    assert reference.clip_embedding.shape == (1, 1, 32) and reference.latent.shape == (1, 4, 8, 8)
    condition = zero123.condition(reference, torch.tensor([30.0, 0.0]), torch.tensor([90.0, 180.0]))
    camera = torch.tensor([[-torch.pi / 6, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]])
    projected = zero123.camera_projection.proj(
        torch.cat([reference.clip_embedding[0].expand(2, -1), camera], -1)
    )
    assert torch.allclose(condition.context[:, 0], projected, atol=1e-5)
    assert condition.latent.shape == (2, 4, 8, 8)


def test_zero123_sds_is_cfg_over_image_and_camera_with_zero_uncond(zero123: Zero123Denoiser) -> None:
    rgb = torch.rand(2, 3, 20, 20, requires_grad=True)
    latents = zero123.encode_images(rgb, torch.Generator().manual_seed(0))
    reference = zero123.encode_reference(torch.rand(1, 3, 16, 16))
    condition = zero123.condition(reference, torch.tensor([10.0, -20.0]), torch.tensor([45.0, 200.0]))
    config = SDSConfig(guidance_scale=3.0, timesteps=TimestepSchedule(0.6, 0.6))
    out = ScoreDistillationSampling(zero123, config)(
        latents, condition, None, generator=torch.Generator().manual_seed(1)
    )

    replay = torch.Generator().manual_seed(1)
    t = torch.randint(600, 601, (2,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    alpha_bar = zero123.alphas_cumprod[600]
    x_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_c = zero123.unet(
            torch.cat([x_t, condition.latent], 1), t, encoder_hidden_states=condition.context
        ).sample
        uncond_input = torch.cat([x_t, torch.zeros_like(condition.latent)], 1)
        eps_u = zero123.unet(
            uncond_input, t, encoder_hidden_states=torch.zeros_like(condition.context)
        ).sample
    assert torch.allclose(out.grad, (1 - alpha_bar) * (eps_u + 3.0 * (eps_c - eps_u) - noise), atol=1e-4)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_reference_view_losses_hand_checked() -> None:
    reference_rgb = torch.zeros(1, 3, 2, 2)
    reference_mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    rgb = torch.ones(1, 3, 2, 2)
    opacity = torch.full((1, 1, 2, 2), 0.5)
    plain = reference_view_losses(rgb, opacity, reference_rgb, reference_mask)
    assert plain.rgb.item() == pytest.approx(1.0) and plain.mask.item() == pytest.approx(0.25)
    on_white = reference_view_losses(rgb, opacity, reference_rgb, reference_mask, background=torch.ones(3))
    assert on_white.rgb.item() == pytest.approx(0.5)  # the background half matches the white render


def test_missing_zero123_model_names_it_and_the_download() -> None:
    assert Zero123Config().pretrained_model_name_or_path == "ashawkey/zero123-xl-diffusers"
    with pytest.raises(GuidanceModelNotFoundError, match="hf download ashawkey/zero123-xl-diffusers"):
        Zero123Denoiser.from_pretrained(Zero123Config(), "cpu")
