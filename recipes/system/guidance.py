"""The guidance a recipe distils, chosen in the config: Stable Diffusion, DeepFloyd IF or the closed-form prior.

:class:`GuidanceConfig` names the model; :meth:`Guidance.load` loads it through ``from_pretrained`` (a hub id
or a local folder) or builds the weight-free prior, embeds the prompt once (cached on disk), and gives the
system two things: :meth:`Guidance.encode` (renders → the denoiser's space) and :meth:`Guidance.conditions`
(cameras → CFG condition and uncondition). The model is never part of the LightningModule's parameters or
state dict: it is frozen, and under Picard it must not be Picard state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.loading import TorchDType, load_noise_schedule
from recipes.guidance.prompts import PromptConfig, PromptEmbeddings

GuidanceModel = Literal["stable-diffusion", "deepfloyd-if", "closed-form"]


@dataclass
class ClosedFormPriorConfig:
    """The weight-free prior of the procedural object (docs/recipes/closed-form-prior.md).

    Attributes:
        height: resolution of its reference images; renders must have this size. Default is 32.
        sigma_deg: width of the camera kernel on the mixture weights. Default is 10°.
        restrict_deg: keep only references within this angle of the view (None: all). Default is None.
    """

    height: int = 32
    sigma_deg: float | None = 10.0
    restrict_deg: float | None = None


@dataclass
class GuidanceConfig:
    """Which diffusion model guides the optimisation.

    Attributes:
        model: ``"stable-diffusion"``, ``"deepfloyd-if"`` or ``"closed-form"``. Default is ``"stable-diffusion"``.
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout; None is the model's
            usual checkpoint (SD 2.1 base, IF-I-XL). Default is None.
        torch_dtype: ``"auto"`` is float16 on GPU and float32 on CPU. Default is ``"auto"``.
        variant: weight file variant (e.g. ``"fp16"``). Default is None.
        image_resolution: renders are resized to this before encoding; None is the model's own (512 for
            Stable Diffusion 2.1 base, 64 for IF stage I). Default is None.
        closed_form: settings of the weight-free prior (``model: closed-form``).
    """

    model: GuidanceModel = "stable-diffusion"
    pretrained_model_name_or_path: str | None = None
    torch_dtype: TorchDType = "auto"
    variant: str | None = None
    image_resolution: int | None = None
    closed_form: ClosedFormPriorConfig = field(default_factory=ClosedFormPriorConfig)

    def __post_init__(self) -> None:
        if self.model not in ("stable-diffusion", "deepfloyd-if", "closed-form"):
            raise ValueError(
                f"unknown guidance model {self.model!r}; use 'stable-diffusion', 'deepfloyd-if' or 'closed-form'"
            )

    def model_config(self) -> Any:
        """The model wrapper's own config (``StableDiffusionConfig`` or ``DeepFloydIFConfig``)."""
        from recipes.guidance.deepfloyd_if import DeepFloydIFConfig
        from recipes.guidance.stable_diffusion import StableDiffusionConfig

        given = {
            "pretrained_model_name_or_path": self.pretrained_model_name_or_path,
            "image_resolution": self.image_resolution,
        }
        path = {k: v for k, v in given.items() if v is not None}
        if self.model == "stable-diffusion":
            return StableDiffusionConfig(torch_dtype=self.torch_dtype, **path)
        return DeepFloydIFConfig(torch_dtype=self.torch_dtype, variant=self.variant, **path)

    def check_available(self) -> None:
        """Raise :class:`~recipes.guidance.GuidanceModelNotFoundError` now if the model is not on this machine.

        Reads only the noise schedule (a small config file), through the same ``from_pretrained`` path as the
        full load, so a bad id or a missing download fails before any run folder is written.
        """
        if self.model == "closed-form":
            return
        from recipes.guidance.deepfloyd_if import DeepFloydIFDenoiser
        from recipes.guidance.stable_diffusion import StableDiffusionDenoiser

        model_class = StableDiffusionDenoiser if self.model == "stable-diffusion" else DeepFloydIFDenoiser
        load_noise_schedule(self.model_config().pretrained_model_name_or_path, model_class.CONFIG_HINT)

    def required_resolution(self) -> tuple[int, int] | None:
        """The render size the model needs, or None when it resizes renders itself."""
        if self.model == "closed-form":
            return self.closed_form.height, self.closed_form.height
        return None


class Guidance:
    """A loaded denoiser with the prompt's embeddings: what the system distils from.

    Build it with :meth:`load`. ``denoiser`` implements :class:`~recipes.guidance.Denoiser`.
    """

    def __init__(self, config: GuidanceConfig, denoiser: Denoiser, prompts: PromptEmbeddings | None) -> None:
        self.config = config
        self.denoiser = denoiser
        self.prompts = prompts

    @classmethod
    def load(cls, config: GuidanceConfig, prompt: PromptConfig, device: torch.device) -> Guidance:
        """Load the model onto ``device`` and embed ``prompt`` (text models only)."""
        if config.model == "closed-form":
            from recipes.guidance.closed_form import ClosedFormPrior

            prior = ClosedFormPrior.from_procedural_object(
                height=config.closed_form.height,
                sigma_deg=config.closed_form.sigma_deg,
                restrict_deg=config.closed_form.restrict_deg,
            )
            return cls(config, prior.to(device), None)
        if config.model == "stable-diffusion":
            from recipes.guidance.stable_diffusion import StableDiffusionDenoiser as model_class
        else:
            from recipes.guidance.deepfloyd_if import DeepFloydIFDenoiser as model_class
        denoiser = model_class.from_pretrained(config.model_config(), device=device)
        prompts = PromptEmbeddings.compute(prompt, denoiser.text_encoding()).to(device, denoiser.dtype)
        return cls(config, denoiser, prompts)

    def encode(self, rgb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Renders ``[B, H, W, 3]`` in [0, 1] → the denoiser's input space (differentiable)."""
        images = rgb.permute(0, 3, 1, 2)
        if self.config.model == "closed-form":
            expected = self.config.required_resolution()
            if tuple(images.shape[-2:]) != expected:
                raise ValueError(
                    f"the closed-form prior needs {expected[0]}x{expected[1]} renders, got "
                    f"{images.shape[-2]}x{images.shape[-1]}; set data.cameras.height/width to "
                    f"{expected[0]} or guidance.closed_form.height to the render size"
                )
            return images.float() * 2.0 - 1.0
        return self.denoiser.encode_images(images, generator)

    def conditions(self, cameras: Cameras) -> tuple[Any, Any]:
        """(condition, uncondition) for CFG: the cameras for the prior, view-dependent text otherwise."""
        if self.prompts is None:
            return cameras, None
        return self.prompts.for_views(cameras.elevation_deg, cameras.azimuth_deg)


def prompt_config(prompt: str, options: PromptConfig | None) -> PromptConfig:
    """``options`` (view-dependent prompting, negative prompt, cache) with its text set to ``prompt``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            'the prompt is empty; pass the text to generate, e.g. --model.prompt "a ripe strawberry"'
        )
    return replace(options if options is not None else PromptConfig(), prompt=prompt.strip())
