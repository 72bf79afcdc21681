"""VSD with a peft LoRA particle score on tiny random checkpoints loaded through the real path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sd_folder, tiny_sd_v_folder  # noqa: F401  (module-scoped fixtures)

from recipes.guidance.lora import (
    LoRAParticleConfig,
    LoRAParticleScore,
    ParticleCondition,
    camera_dropout_mask,
)
from recipes.guidance.parameterization import epsilon_from_prediction
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionDenoiser
from recipes.guidance.vsd import VariationalScoreDistillation, VSDConfig


@pytest.fixture(scope="module")
def vsd(tiny_sd_folder: Path, tiny_sd_v_folder: Path) -> VariationalScoreDistillation:  # noqa: F811
    pretrained = StableDiffusionDenoiser.from_pretrained(StableDiffusionConfig(str(tiny_sd_folder)), "cpu")
    particle = LoRAParticleScore.from_pretrained(
        LoRAParticleConfig(str(tiny_sd_v_folder), learning_rate=1e-2), "cpu"
    )
    return VariationalScoreDistillation(pretrained, particle, VSDConfig(timesteps=TimestepSchedule(0.4, 0.4)))


def _condition(batch: int) -> ParticleCondition:
    generator = torch.Generator().manual_seed(11)
    return ParticleCondition(
        torch.randn(1, 16, 32, generator=generator), torch.randn(batch, 16, generator=generator)
    )


def test_particle_is_a_v_prediction_unet_with_rank4_lora_on_attention(
    vsd: VariationalScoreDistillation,
) -> None:
    particle = vsd.particle
    assert particle.prediction_type == "v_prediction" and particle.unet.dtype == torch.float32
    names = [n for n, p in particle.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("class_embedding.") for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n} <= {
        "to_q",
        "to_k",
        "to_v",
        "0",
    }
    assert all(p.shape[0] == 4 for n, p in particle.unet.named_parameters() if "lora_A" in n)


def test_vsd_gradient_is_pretrained_cfg_minus_particle_score(vsd: VariationalScoreDistillation) -> None:
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    text, uncond = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    condition = _condition(2)
    out = vsd(latents, text, uncond, condition, generator=torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(4)
    t = torch.randint(400, 401, (2,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    alpha_bar = vsd.pretrained.alphas_cumprod[400]
    x_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_c = vsd.pretrained.unet(x_t, t, encoder_hidden_states=text).sample
        eps_u = vsd.pretrained.unet(x_t, t, encoder_hidden_states=uncond).sample
        v = vsd.particle.unet(
            x_t, t, encoder_hidden_states=condition.text.expand(2, -1, -1), class_labels=condition.camera
        ).sample
    eps_particle = epsilon_from_prediction(v, x_t, t, vsd.particle.alphas_cumprod, "v_prediction")
    expected = (1 - alpha_bar) * (eps_u + 7.5 * (eps_c - eps_u) - eps_particle)
    assert torch.allclose(out.grad, expected, atol=1e-4)
    out.loss.backward()
    assert latents.grad is not None and all(p.grad is None for p in vsd.lora_parameters())


def test_lora_step_changes_the_lora_and_not_the_base_unets(vsd: VariationalScoreDistillation) -> None:
    lora_before = vsd.particle.lora_state_dict()
    base_before = {n: p.clone() for n, p in vsd.particle.unet.named_parameters() if not p.requires_grad}
    pretrained_before = {n: p.clone() for n, p in vsd.pretrained.unet.named_parameters()}
    optimizer = vsd.configure_lora_optimizer()
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["eps"] == 1e-15

    loss = vsd.lora_loss(
        torch.randn(2, 4, 8, 8, requires_grad=True), _condition(2), torch.Generator().manual_seed(0)
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    lora_after = vsd.particle.lora_state_dict()
    changed = [n for n in lora_before if not torch.equal(lora_before[n], lora_after[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("class_embedding.") for n in changed)
    assert all(
        torch.equal(p, base_before[n]) for n, p in vsd.particle.unet.named_parameters() if n in base_before
    )
    assert all(torch.equal(p, pretrained_before[n]) for n, p in vsd.pretrained.unet.named_parameters())
    vsd.particle.load_lora_state_dict(lora_before)
    assert all(torch.equal(vsd.particle.lora_state_dict()[n], lora_before[n]) for n in lora_before)


def test_lora_loss_is_v_regression_with_its_own_t_noise_and_camera_dropout(
    vsd: VariationalScoreDistillation,
) -> None:
    latents, condition = torch.randn(3, 4, 8, 8), _condition(3)
    loss = vsd.lora_loss(latents, condition, torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (3,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    dropped = torch.rand(3, generator=replay) < 0.1
    alpha_bar = vsd.particle.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    camera = torch.where(dropped[:, None], torch.zeros_like(condition.camera), condition.camera)
    with torch.no_grad():
        prediction = vsd.particle.unet(
            x_t, t, encoder_hidden_states=condition.text.expand(3, -1, -1), class_labels=camera
        ).sample
    target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(loss, torch.nn.functional.mse_loss(prediction, target), rtol=1e-4)


def test_camera_dropout_rate() -> None:
    mask = camera_dropout_mask(20000, 0.1, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0.09 < mask.float().mean().item() < 0.11
