"""DeepFloyd IF stage I guidance (pixel space, T5) through the real loading path on a tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_if_folder  # noqa: F401  (module-scoped fixture)

from recipes.guidance.deepfloyd_if import DeepFloydIFConfig, DeepFloydIFDenoiser
from recipes.guidance.loading import GuidanceModelNotFoundError
from recipes.guidance.prompts import PromptConfig, PromptEmbeddings
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig


@pytest.fixture(scope="module")
def deepfloyd(tiny_if_folder: Path) -> DeepFloydIFDenoiser:  # noqa: F811
    return DeepFloydIFDenoiser.from_pretrained(DeepFloydIFConfig(str(tiny_if_folder)), device="cpu")


def test_if_prompts_use_t5_with_77_tokens(deepfloyd: DeepFloydIFDenoiser, tmp_path: Path) -> None:
    config = PromptConfig(prompt="a photo of a cat", cache_dir=str(tmp_path))
    prompts = PromptEmbeddings.compute(config, deepfloyd.text_encoding())
    assert prompts.directional.shape == (4, 77, 32)
    assert deepfloyd.text_encoding().cache_key.startswith("t5:")
    assert len(list(tmp_path.glob("*.pt"))) == 6


def test_if_sds_is_in_64px_pixel_space_and_uses_the_eps_channels(deepfloyd: DeepFloydIFDenoiser) -> None:
    rgb = torch.rand(1, 3, 32, 32, requires_grad=True)
    x = deepfloyd.encode_images(rgb)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    config = SDSConfig(guidance_scale=21.0, timesteps=TimestepSchedule(0.5, 0.5))
    out = ScoreDistillationSampling(deepfloyd, config)(
        x, cond, uncond, generator=torch.Generator().manual_seed(0)
    )

    replay = torch.Generator().manual_seed(0)
    t = torch.randint(500, 501, (1,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    alpha_bar = deepfloyd.alphas_cumprod[500]
    x_t = alpha_bar.sqrt() * x.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_c = deepfloyd.unet(x_t, t, encoder_hidden_states=cond).sample[:, :3]
        eps_u = deepfloyd.unet(x_t, t, encoder_hidden_states=uncond).sample[:, :3]
    assert torch.allclose(out.grad, (1 - alpha_bar) * (eps_u + 21.0 * (eps_c - eps_u) - noise), atol=1e-4)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_if_sds_with_perp_neg_matches_the_formula_on_the_eps_channels(deepfloyd: DeepFloydIFDenoiser) -> None:
    from recipes.guidance.cfg import PerpNegCondition, perpendicular_component

    generator = torch.Generator().manual_seed(1)
    positive, negative, uncond = (torch.randn(2, 77, 32, generator=generator) for _ in range(3))
    weights = torch.tensor([[-1.5], [-0.5]])
    x = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    config = SDSConfig(guidance_scale=21.0, timesteps=TimestepSchedule(0.5, 0.5))
    out = ScoreDistillationSampling(deepfloyd, config)(
        x, PerpNegCondition(positive, [negative], weights), uncond, generator=torch.Generator().manual_seed(0)
    )
    replay = torch.Generator().manual_seed(0)
    t = torch.randint(500, 501, (2,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    alpha_bar = deepfloyd.alphas_cumprod[500]
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps = {
            k: deepfloyd.unet(x_t, t, encoder_hidden_states=v).sample[:, :3]
            for k, v in {"pos": positive, "neg": negative, "u": uncond}.items()
        }
    e_pos = eps["pos"] - eps["u"]
    combined = e_pos + weights.view(2, 1, 1, 1) * perpendicular_component(eps["neg"] - eps["u"], e_pos)
    expected = (1 - alpha_bar) * (eps["u"] + 21.0 * combined - noise)
    assert torch.allclose(out.grad, expected, atol=1e-4)


def test_missing_if_model_names_it_and_the_download() -> None:
    assert DeepFloydIFConfig().pretrained_model_name_or_path == "DeepFloyd/IF-I-XL-v1.0"
    with pytest.raises(GuidanceModelNotFoundError, match=r"hf download DeepFloyd/IF-I-XL-v1\.0"):
        DeepFloydIFDenoiser.from_pretrained(DeepFloydIFConfig(), device="cpu")
