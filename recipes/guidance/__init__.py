"""Score-distillation guidance: the gradients every recipe distills.

Losses (:class:`ScoreDistillationSampling`, :class:`AsynchronousScoreDistillation`,
:class:`ClassifierScoreDistillation`, :class:`VariationalScoreDistillation`) take any :class:`Denoiser`: Stable Diffusion, DeepFloyd IF,
Zero-1-to-3 or the weight-free closed-form prior (``recipes.guidance.closed_form``). CFG follows
diffusers' convention ε_u + s·(ε_c − ε_u) everywhere (see :mod:`recipes.guidance.cfg`). SDS, ASD and CSD share
one base, :class:`ScoreDistillation`, and hold only their own math.

Importing this package imports neither diffusers nor transformers nor peft; the model wrappers import
them when a model is loaded.
"""

from recipes.guidance.asd import ASDConfig, AsynchronousScoreDistillation
from recipes.guidance.cfg import (
    PerpNegCondition,
    classifier_free_guidance,
    perp_neg_guidance,
    perpendicular_component,
    predict_guided_noise,
)
from recipes.guidance.csd import ClassifierScoreDistillation, CSDConfig
from recipes.guidance.deepfloyd_if import DeepFloydIFConfig, DeepFloydIFDenoiser
from recipes.guidance.denoiser import Denoiser
from recipes.guidance.distillation import DistillationOutput, ScoreDistillation
from recipes.guidance.loading import GuidanceModelNotFoundError
from recipes.guidance.lora import LoRAParticleConfig, LoRAParticleScore, ParticleCondition
from recipes.guidance.prompts import (
    PerpNegViews,
    PretrainedTextEncoding,
    PromptConfig,
    PromptEmbeddings,
    perp_neg_views,
)
from recipes.guidance.reference_view import ReferenceViewLosses, reference_depth_loss, reference_view_losses
from recipes.guidance.schedules import TimestepSchedule, scalar_at, timestep_weight
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionDenoiser
from recipes.guidance.vsd import VariationalScoreDistillation, VSDConfig
from recipes.guidance.zero123 import Zero123Condition, Zero123Config, Zero123Denoiser, Zero123Reference

__all__ = [
    "ASDConfig",
    "AsynchronousScoreDistillation",
    "CSDConfig",
    "ClassifierScoreDistillation",
    "DeepFloydIFConfig",
    "DeepFloydIFDenoiser",
    "Denoiser",
    "DistillationOutput",
    "GuidanceModelNotFoundError",
    "LoRAParticleConfig",
    "LoRAParticleScore",
    "ParticleCondition",
    "PerpNegCondition",
    "PerpNegViews",
    "PretrainedTextEncoding",
    "PromptConfig",
    "PromptEmbeddings",
    "ReferenceViewLosses",
    "SDSConfig",
    "ScoreDistillation",
    "ScoreDistillationSampling",
    "StableDiffusionConfig",
    "StableDiffusionDenoiser",
    "TimestepSchedule",
    "VSDConfig",
    "VariationalScoreDistillation",
    "Zero123Condition",
    "Zero123Config",
    "Zero123Denoiser",
    "Zero123Reference",
    "classifier_free_guidance",
    "perp_neg_guidance",
    "perp_neg_views",
    "perpendicular_component",
    "predict_guided_noise",
    "reference_depth_loss",
    "reference_view_losses",
    "scalar_at",
    "timestep_weight",
]
