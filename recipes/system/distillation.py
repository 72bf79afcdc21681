"""Which score distillation a recipe runs, chosen in the config: SDS, ScaleDreamer's ASD, classifier score
distillation (CSD) or ProlificDreamer's VSD.

``model.distillation.method`` picks the loss; each method's settings sit beside it (``asd:``, ``csd:``,
``vsd:`` and ``particle:``; SDS keeps its settings in ``model.sds`` so existing configs run unchanged). :class:`Distiller` is the
one object :meth:`recipes.system.TextTo3D.training_step` calls: renders in the denoiser's space and the cameras
in, the distilled loss out, with every random draw from the step's generators.

VSD also trains a particle score next to the scene. Its trainable part is an ``nn.Module`` the system registers
(:func:`particle_module`):

- on Stable Diffusion, ProlificDreamer's LoRA (peft adapters + camera embedding on its own UNet,
  :class:`~recipes.guidance.lora.LoRAParticleScore`), loaded when the guidance loads;
- on the weight-free closed-form prior, the prior itself with a zero-initialised adapter on its reference images
  (:mod:`recipes.guidance.prior_particle`), built with the system.

``particle.placement`` says what Picard does with it: ``rank_local`` (the paper's choice, the default) keeps one
copy per rank, trained after each evaluation and never communicated; ``replayed`` (the option the paper
rejected) makes it Picard state like the 3D parameters, in the main optimizer, gathered, replayed and compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recipes.data.cameras import Cameras
from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation
from recipes.guidance.csd import ClassifierScoreDistillation, CSDConfig
from recipes.guidance.distillation import DistillationOutput
from recipes.guidance.lora import LoRAParticleConfig, LoRAParticleScore, ParticleCondition
from recipes.guidance.prior_particle import PriorParticleConfig, PriorParticleScore, ReferenceAdapter
from recipes.guidance.schedules import ScalarSchedule, scalar_at
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.guidance.vsd import VariationalScoreDistillation, VSDConfig
from recipes.system.guidance import Guidance, GuidanceConfig

DistillationMethod = Literal["sds", "asd", "csd", "vsd"]
ParticlePlacement = Literal["rank_local", "replayed"]
ParticleScore = LoRAParticleScore | PriorParticleScore


@dataclass
class ParticleConfig:
    """VSD's particle score and where its trainables live under Picard.

    Attributes:
        placement: ``"rank_local"`` (each rank trains its own copy after every evaluation, never communicated: the
            paper's choice) or ``"replayed"`` (Picard state like the 3D parameters: one copy, trained by the main
            optimizer in a param group of its own, exact at threshold 0 on any number of ranks). Default is
            ``"rank_local"``.
        weight: weight of the particle loss (threestudio's ``lambda_lora``; a number or a step schedule). Default
            is 1.
        lora: the LoRA on Stable Diffusion (base UNet, rank, target modules, camera dropout, AdamW). Default is
            ProlificDreamer's (SD 2.1, v-prediction, rank 4 on the attention projections, lr 1e-4).
        prior: the particle of the closed-form prior (its adapted references). Default is
            :class:`~recipes.guidance.prior_particle.PriorParticleConfig`'s.
    """

    placement: ParticlePlacement = "rank_local"
    weight: ScalarSchedule = 1.0
    lora: LoRAParticleConfig = field(default_factory=LoRAParticleConfig)
    prior: PriorParticleConfig = field(default_factory=PriorParticleConfig)

    def __post_init__(self) -> None:
        if self.placement not in ("rank_local", "replayed"):
            raise ValueError(
                f"unknown particle placement {self.placement!r}; use 'rank_local' (the paper's) or 'replayed'"
            )


@dataclass
class DistillationConfig:
    """The score distillation of a recipe.

    Attributes:
        method: ``"sds"`` (settings in ``model.sds``), ``"asd"``, ``"csd"`` or ``"vsd"``. Default is ``"sds"``.
        asd: Asynchronous Score Distillation settings (ScaleDreamer: CFG 7.5, η = 0.1 random shift). Default is
            ScaleDreamer's.
        csd: Classifier Score Distillation settings (ω·w(t)·(ε_c − ε_u)). Default is ω = 7.5, w(t) = 1 − ᾱ_t.
        vsd: Variational Score Distillation settings (ProlificDreamer: CFG 7.5, camera CFG 1). Default is
            ProlificDreamer's.
        particle: VSD's particle score. Default is ProlificDreamer's LoRA, rank-local.
    """

    method: DistillationMethod = "sds"
    asd: ASDConfig = field(default_factory=ASDConfig)
    csd: CSDConfig = field(default_factory=CSDConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    particle: ParticleConfig = field(default_factory=ParticleConfig)

    def __post_init__(self) -> None:
        if self.method not in ("sds", "asd", "csd", "vsd"):
            raise ValueError(f"unknown distillation method {self.method!r}; use 'sds', 'asd', 'csd' or 'vsd'")

    def check_guidance(self, guidance: GuidanceConfig) -> None:
        """Raise ``ValueError`` if the method cannot run on ``guidance``'s model."""
        if self.method == "vsd" and guidance.model not in ("stable-diffusion", "closed-form"):
            raise ValueError(
                f"VSD needs a latent model its LoRA can share (stable-diffusion) or the closed-form prior, not "
                f"{guidance.model!r}; set model.guidance.model to stable-diffusion, or use "
                "model.distillation.method sds or asd"
            )


def particle_module(config: DistillationConfig, guidance: GuidanceConfig) -> nn.Module | None:
    """The trainable part of the particle score that exists before any model is loaded (the closed-form prior's
    adapter), or None (no VSD, or a LoRA that is built when the guidance loads)."""
    if config.method != "vsd" or guidance.model != "closed-form":
        return None
    height = guidance.closed_form.height
    return ReferenceAdapter((len(prior_reference_cameras(guidance)), 3, height, height))


def prior_reference_cameras(guidance: GuidanceConfig) -> Cameras:
    """The cameras of the closed-form prior's references (``guidance.model`` ``closed-form``), in their order."""
    from recipes.data.procedural import reference_cameras

    height = guidance.closed_form.height
    return reference_cameras(height=height, width=height)


class LoRAParameters(nn.Module):
    """The LoRA's trainable tensors (inside its frozen UNet) registered on the system, the UNet itself not."""

    def __init__(self, score: LoRAParticleScore) -> None:
        super().__init__()
        self.tensors = nn.ParameterDict(
            {name.replace(".", "__"): p for name, p in score.unet.named_parameters() if p.requires_grad}
        )


def camera_condition(cameras: Cameras) -> Tensor:
    """The particle's camera input: flattened camera-to-world matrices ``[B, 16]`` (ProlificDreamer's
    ``extrinsics``)."""
    return cameras.c2w.reshape(cameras.c2w.shape[0], 16).float()


class Distiller:
    """The configured loss bound to a loaded :class:`~recipes.system.guidance.Guidance` (and VSD's particle).

    Build it with :meth:`build`; call it on the step's renders (in the denoiser's space).
    """

    def __init__(
        self,
        config: DistillationConfig,
        sds: SDSConfig,
        guidance: Guidance,
        particle: ParticleScore | None = None,
    ) -> None:
        self.config = config
        self.guidance = guidance
        self.particle = particle
        if config.method == "sds":
            self.loss: Any = ScoreDistillationSampling(guidance.denoiser, sds)
        elif config.method == "asd":
            self.loss = AsynchronousScoreDistillation(guidance.denoiser, config.asd)
        elif config.method == "csd":
            self.loss = ClassifierScoreDistillation(guidance.denoiser, config.csd)
        else:
            if particle is None:
                raise ValueError("VSD needs its particle score; build the Distiller with Distiller.build")
            self.loss = VariationalScoreDistillation(guidance.denoiser, particle, config.vsd)

    @classmethod
    def build(
        cls,
        config: DistillationConfig,
        sds: SDSConfig,
        guidance: Guidance,
        adapter: nn.Module | None,
        device: torch.device,
    ) -> Distiller:
        """The distiller of ``config`` on ``guidance``; VSD's LoRA is loaded here, the prior's adapter is the
        system's (:func:`particle_module`)."""
        particle: ParticleScore | None = None
        if config.method == "vsd":
            if guidance.config.model == "closed-form":
                if not isinstance(adapter, ReferenceAdapter):
                    raise ValueError("VSD on the closed-form prior needs the system's ReferenceAdapter")
                particle = PriorParticleScore(guidance.denoiser, adapter, config.particle.prior)
            else:
                particle = LoRAParticleScore.from_pretrained(config.particle.lora, device)
        return cls(config, sds, guidance, particle)

    @property
    def name(self) -> str:
        """The method's name in logged metrics (``train/loss_<name>``)."""
        return self.config.method

    def particle_condition(self, cameras: Cameras) -> ParticleCondition:
        """The particle's condition: the view-independent prompt (none for the prior) and the cameras."""
        prompts = self.guidance.prompts
        text = None if prompts is None else prompts.view_independent
        return ParticleCondition(text, camera_condition(cameras))

    def __call__(
        self, x: Tensor, cameras: Cameras, global_step: int, generator: torch.Generator
    ) -> DistillationOutput:
        """The distilled loss of renders ``x`` (the denoiser's space, differentiable) seen from ``cameras``."""
        condition, uncondition = self.guidance.conditions(cameras)
        if self.config.method == "vsd":
            return self.loss(
                x,
                condition,
                uncondition,
                self.particle_condition(cameras),
                global_step=global_step,
                generator=generator,
            )
        return self.loss(x, condition, uncondition, global_step=global_step, generator=generator)

    def particle_loss(
        self, x: Tensor, cameras: Cameras, global_step: int, generator: torch.Generator
    ) -> Tensor | None:
        """VSD's particle loss on the detached renders, weighted; None for SDS, ASD and CSD."""
        if self.particle is None:
            return None
        weight = scalar_at(self.config.particle.weight, global_step)
        return weight * self.particle.lora_loss(x, self.particle_condition(cameras), generator)

    def start_particle(self, render: Callable[[Cameras], Tensor]) -> bool:
        """Start the closed-form prior's particle at the scene's renders (``particle.prior.start: renders``):
        ``render(cameras)`` gives RGB ``[N, H, W, 3]`` in [0, 1] from the reference cameras. Returns whether it
        did (False for SDS/ASD/CSD, a LoRA particle, or ``start: prior``)."""
        particle = self.particle
        if not isinstance(particle, PriorParticleScore) or particle.config.start != "renders":
            return False
        with torch.no_grad():
            renders = self.guidance.encode(render(prior_reference_cameras(self.guidance.config)))
        particle.start_from(renders)
        return True

    def particle_optimizer(self) -> torch.optim.Optimizer | None:
        """The particle's own AdamW (rank-local placement), or None."""
        return None if self.particle is None else self.particle.configure_lora_optimizer()

    def particle_param_group(self) -> dict[str, Any] | None:
        """The particle's parameters as a param group for the main optimizer (replayed placement), or None."""
        if self.particle is None:
            return None
        cfg = self.particle.config
        return {
            "params": self.particle.lora_parameters(),
            "lr": cfg.learning_rate,
            "betas": cfg.betas,
            "eps": cfg.eps,
            "weight_decay": cfg.weight_decay,
            "name": "particle",
        }
