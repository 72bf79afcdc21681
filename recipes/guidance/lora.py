"""ProlificDreamer's particle score: a LoRA-adapted, camera-conditioned diffusion UNet (diffusers + peft).

The UNet (by default the v-prediction ``stabilityai/stable-diffusion-2-1``) is frozen; peft LoRA
adapters of rank 4 sit on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and a
small MLP embeds the flattened 4×4 camera-to-world matrix into the UNet's class-embedding slot. Only the
adapters and the camera embedding train, on detached latents, with their own timestep and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from recipes.guidance.loading import (
    TorchDType,
    default_device,
    load_noise_schedule,
    load_pretrained,
    resolve_dtype,
)
from recipes.guidance.parameterization import PredictionType, add_noise, epsilon_from_prediction, velocity
from recipes.guidance.randomness import rand, randint, randn_like

DEFAULT_LORA_BASE_MODEL = "stabilityai/stable-diffusion-2-1"
CAMERA_DIM = 16


@dataclass
class LoRAParticleConfig:
    """The LoRA particle model and its training.

    Attributes:
        pretrained_model_name_or_path: the UNet the LoRA adapts (threestudio: SD 2.1, v-prediction).
        torch_dtype: dtype of the frozen UNet (``auto``: fp16 on GPU, fp32 on CPU); adapters stay fp32.
        rank: LoRA rank; ``lora_alpha`` equals it (scale 1).
        target_modules: attention projections that get adapters.
        camera_dropout: probability of replacing a view's camera by zeros during LoRA training, which
            teaches the camera-unconditional branch used by camera CFG.
        timestep_samples: (t, noise) draws per latent in one LoRA loss.
        learning_rate, betas, eps, weight_decay: AdamW for adapters + camera embedding (ProlificDreamer;
            weight decay is torch's AdamW default, which threestudio keeps).
    """

    pretrained_model_name_or_path: str = DEFAULT_LORA_BASE_MODEL
    torch_dtype: TorchDType = "auto"
    rank: int = 4
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    camera_dropout: float = 0.1
    timestep_samples: int = 1
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01


@dataclass
class ParticleCondition:
    """Condition of the particle score: text embeddings [B or 1, L, D] (None for a model without text) and
    cameras [B, 16] (flattened c2w).

    ``camera=None`` is the camera-unconditional branch (zeros).
    """

    text: torch.Tensor | None
    camera: torch.Tensor | None = None

    def without_camera(self) -> ParticleCondition:
        return ParticleCondition(self.text, None)


def camera_dropout_mask(
    batch_size: int, probability: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """True for the views whose camera is dropped (each independently with ``probability``)."""
    return rand((batch_size,), device, generator) < probability


def particle_optimizer(parameters: list[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """AdamW over a particle's trainables with ``config``'s ``learning_rate``, ``betas``, ``eps``, ``weight_decay``."""
    return torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def noised_samples(
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
    repeats: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A particle loss's samples: the renders ``latents`` (detached) ``repeats`` times each, fresh t ~ U{0, …, T−1}
    and noise (drawn in that order from ``generator``), and the noised ``x_t``; returns (x0, t, noise, x_t)."""
    x0 = latents.detach().float().repeat_interleave(repeats, dim=0)
    t = randint(0, num_train_timesteps, (x0.shape[0],), x0.device, generator)
    noise = randn_like(x0, generator)
    return x0, t, noise, add_noise(alphas_cumprod, x0, noise, t)


class LoRAParticleScore:
    """A frozen UNet + trainable LoRA + camera embedding, seen as an ε-predicting :class:`Denoiser`.

    Not an ``nn.Module`` on purpose: the frozen UNet must stay out of the LightningModule's parameters.
    The trainable part is :meth:`lora_parameters` (with :meth:`lora_state_dict` for checkpoints).
    """

    CONFIG_HINT = "guidance.lora.pretrained_model_name_or_path"

    def __init__(
        self,
        unet: Any,
        alphas_cumprod: torch.Tensor,
        prediction_type: PredictionType,
        config: LoRAParticleConfig,
    ) -> None:
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig

        self.config = config
        self.prediction_type = prediction_type
        self.unet = unet.eval().requires_grad_(False)
        try:
            self.unet.add_adapter(
                LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=list(config.target_modules)),
                adapter_name="particle",
            )
        except ValueError as error:
            if "not found" not in str(error):
                raise
            raise ValueError(
                f"VSD puts its LoRA on the modules {list(config.target_modules)} of {config.pretrained_model_name_or_path}"
                ", which has none of them; set model.distillation.particle.lora.target_modules to that UNet's "
                "attention projections (e.g. [to_q, to_k, to_v, to_out.0]) or its pretrained_model_name_or_path to a "
                "Stable Diffusion UNet"
            ) from None
        time_embed_dim = self.unet.time_embedding.linear_2.out_features
        self.unet.class_embedding = TimestepEmbedding(CAMERA_DIM, time_embed_dim).to(self.unet.device)
        for parameter in self.lora_parameters():
            parameter.data = parameter.data.float()
        self.alphas_cumprod = alphas_cumprod.to(self.unet.device)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_pretrained(
        cls, config: LoRAParticleConfig | None = None, device: torch.device | str | None = None
    ) -> LoRAParticleScore:
        """Load the base UNet and its schedule (hub id or local folder), then attach LoRA + camera embedding."""
        from diffusers import UNet2DConditionModel

        config = config or LoRAParticleConfig()
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(config.torch_dtype, device)
        path = config.pretrained_model_name_or_path
        alphas_cumprod, _, prediction_type = load_noise_schedule(path, cls.CONFIG_HINT)
        unet = load_pretrained(
            UNet2DConditionModel, path, "unet", config_hint=cls.CONFIG_HINT, torch_dtype=dtype
        )
        return cls(unet.to(device), alphas_cumprod, prediction_type, config)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: LoRA adapters and the camera embedding (rank-local Picard state)."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors, by parameter name."""
        return {n: p.detach().clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors saved by :meth:`lora_state_dict`."""
        parameters = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    def configure_lora_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`lora_parameters` with the configured hyperparameters."""
        return particle_optimizer(self.lora_parameters(), self.config)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: ParticleCondition) -> torch.Tensor:
        batch = x_t.shape[0]
        camera = condition.camera
        camera = torch.zeros(batch, CAMERA_DIM, device=self.device) if camera is None else camera
        dtype = self.unet.dtype
        return self.unet(
            x_t.to(self.device, dtype),
            t.to(self.device),
            encoder_hidden_states=condition.text.to(self.device, dtype).expand(batch, -1, -1),
            class_labels=camera.to(self.device, torch.float32).reshape(batch, CAMERA_DIM),
        ).sample

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: ParticleCondition) -> torch.Tensor:
        """ε̂ of the particle distribution (float32); v-prediction outputs are converted."""
        if condition is None:
            raise ValueError(
                "the particle score needs text embeddings; use ParticleCondition(text, camera=None)"
            )
        output = self._forward(x_t, t, condition)
        return epsilon_from_prediction(output, x_t, t, self.alphas_cumprod, self.prediction_type)

    def lora_loss(
        self, latents: torch.Tensor, condition: ParticleCondition, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The LoRA fitting loss on the current renders' latents (detached here).

        Fresh t ~ U{0, …, T−1} and noise, camera dropout, target ε or v by the model's prediction type,
        mean squared error. Gradients reach only :meth:`lora_parameters`.
        """
        cfg = self.config
        repeats = cfg.timestep_samples
        x0, t, noise, x_t = noised_samples(
            latents, self.alphas_cumprod, self.num_train_timesteps, repeats, generator
        )
        batch = x0.shape[0]
        if self.prediction_type == "v_prediction":
            target = velocity(self.alphas_cumprod, x0, noise, t)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"LoRA training supports epsilon or v_prediction, not {self.prediction_type!r}")
        camera = condition.camera
        if camera is not None:
            camera = camera.reshape(-1, CAMERA_DIM).float().repeat_interleave(repeats, dim=0)
            dropped = camera_dropout_mask(batch, cfg.camera_dropout, camera.device, generator)
            camera = torch.where(dropped[:, None], torch.zeros_like(camera), camera)
        text = condition.text
        if text.shape[0] != 1:
            text = text.repeat_interleave(repeats, dim=0)
        prediction = self._forward(x_t, t, ParticleCondition(text, camera))
        return F.mse_loss(prediction.float(), target.to(self.device).float())
