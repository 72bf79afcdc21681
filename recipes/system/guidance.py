"""The guidance a recipe distils, chosen in the config: Stable Diffusion, DeepFloyd IF, Zero-1-to-3 or the
closed-form prior.

:class:`GuidanceConfig` names the model; :meth:`Guidance.load` loads it through ``from_pretrained`` (a hub id
or a local folder) or builds the weight-free prior, embeds the prompt once (cached on disk), and gives the
system two things: :meth:`Guidance.encode` (renders → the denoiser's space) and :meth:`Guidance.conditions`
(cameras → CFG condition and uncondition). Image-to-3D first calls :meth:`Guidance.condition_on_image`; from
then on conditions are the input view and each camera's offset from it (Zero-1-to-3, or the closed-form prior
conditioned the same way, ``recipes.guidance.image_condition``). The model is never part of the LightningModule's parameters or
state dict: it is frozen, and under Picard it must not be Picard state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.image_condition import ClosedFormImageEncoder, ImageCondition
from recipes.guidance.loading import TorchDType, load_noise_schedule
from recipes.guidance.prompts import PromptConfig, PromptEmbeddings

GuidanceModel = Literal["stable-diffusion", "deepfloyd-if", "zero123", "closed-form"]
IMAGE_MODELS = ("zero123", "closed-form")  # the models that can be conditioned on an input view


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
        model: ``"stable-diffusion"``, ``"deepfloyd-if"``, ``"zero123"`` (image-to-3D) or ``"closed-form"``.
            Default is ``"stable-diffusion"``.
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout; None is the model's
            usual checkpoint (SD 2.1 base, IF-I-XL, ``ashawkey/zero123-xl-diffusers``). Default is None.
        torch_dtype: ``"auto"`` is float16 on GPU and float32 on CPU. Default is ``"auto"``.
        variant: weight file variant (e.g. ``"fp16"``). Default is None.
        image_resolution: renders are resized to this before encoding; None is the model's own (512 for
            Stable Diffusion 2.1 base, 64 for IF stage I, 256 for Zero-1-to-3). Default is None.
        closed_form: settings of the weight-free prior (``model: closed-form``).
    """

    model: GuidanceModel = "stable-diffusion"
    pretrained_model_name_or_path: str | None = None
    torch_dtype: TorchDType = "auto"
    variant: str | None = None
    image_resolution: int | None = None
    closed_form: ClosedFormPriorConfig = field(default_factory=ClosedFormPriorConfig)

    def __post_init__(self) -> None:
        if self.model not in ("stable-diffusion", "deepfloyd-if", "zero123", "closed-form"):
            raise ValueError(
                f"unknown guidance model {self.model!r}; use 'stable-diffusion', 'deepfloyd-if', 'zero123' or "
                "'closed-form'"
            )

    def model_config(self) -> Any:
        """The model wrapper's own config (``StableDiffusionConfig``, ``DeepFloydIFConfig`` or ``Zero123Config``)."""
        from recipes.guidance.deepfloyd_if import DeepFloydIFConfig
        from recipes.guidance.stable_diffusion import StableDiffusionConfig
        from recipes.guidance.zero123 import Zero123Config

        given = {
            "pretrained_model_name_or_path": self.pretrained_model_name_or_path,
            "image_resolution": self.image_resolution,
        }
        path = {k: v for k, v in given.items() if v is not None}
        if self.model == "stable-diffusion":
            return StableDiffusionConfig(torch_dtype=self.torch_dtype, **path)
        if self.model == "zero123":
            return Zero123Config(torch_dtype=self.torch_dtype, **path)
        return DeepFloydIFConfig(torch_dtype=self.torch_dtype, variant=self.variant, **path)

    def check_available(self) -> None:
        """Raise :class:`~recipes.guidance.GuidanceModelNotFoundError` now if the model is not on this machine.

        Reads only the noise schedule (a small config file), through the same ``from_pretrained`` path as the
        full load, so a bad id or a missing download fails before any run folder is written.
        """
        if self.model == "closed-form":
            return
        load_noise_schedule(self.model_config().pretrained_model_name_or_path, self.model_class().CONFIG_HINT)

    def model_class(self) -> type:
        """The denoiser class of a pretrained ``model`` (not the closed-form prior)."""
        if self.model == "stable-diffusion":
            from recipes.guidance.stable_diffusion import StableDiffusionDenoiser

            return StableDiffusionDenoiser
        if self.model == "zero123":
            from recipes.guidance.zero123 import Zero123Denoiser

            return Zero123Denoiser
        from recipes.guidance.deepfloyd_if import DeepFloydIFDenoiser

        return DeepFloydIFDenoiser

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
        self.image: ImageCondition | None = None

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
        denoiser = config.model_class().from_pretrained(config.model_config(), device=device)
        if config.model == "zero123":  # conditioned on an image, not on text
            return cls(config, denoiser, None)
        prompts = PromptEmbeddings.compute(prompt, denoiser.text_encoding()).to(device, denoiser.dtype)
        return cls(config, denoiser, prompts)

    def condition_on_image(self, rgb: Tensor, cameras: Cameras) -> None:
        """Condition every later :meth:`conditions` on the input view ``rgb [1, 3, H, W]`` (in [0, 1], on white)
        seen from ``cameras`` (one view): a camera batch becomes its offsets from that view."""
        if self.config.model not in IMAGE_MODELS:
            raise ValueError(
                f"image-to-3D needs an image-conditioned guidance, not {self.config.model!r}; set "
                "guidance.model to 'zero123' or, weight-free, 'closed-form'"
            )
        encoder = self.denoiser if self.config.model == "zero123" else ClosedFormImageEncoder(self.denoiser)
        self.image = ImageCondition.encode(encoder, rgb, cameras)

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
        """(condition, uncondition) for CFG: the input view and camera offsets after :meth:`condition_on_image`,
        else the cameras for the prior and view-dependent text for the text models."""
        if self.image is not None:
            return self.image(cameras), None
        if self.config.model == "zero123":
            raise ValueError(
                "Zero-1-to-3 guidance is conditioned on an input image: use the recipe system "
                "recipes.system.ImageTo3D with recipes.data.single_image.SingleImageDataModule "
                "(recipes/configs/zero123-nerf.yaml)"
            )
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
