"""What every score-distillation loss shares: the surrogate loss and its output record, the noised sample, the
weighted gradient, and :class:`ScoreDistillation`, the base of SDS, ASD and CSD."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from recipes.guidance.denoiser import Denoiser
from recipes.guidance.parameterization import add_noise
from recipes.guidance.randomness import randn_like
from recipes.guidance.schedules import ScalarSchedule, TimestepSchedule, Weighting, scalar_at, timestep_weight


@dataclass
class DistillationOutput:
    """Result of one score-distillation evaluation.

    Attributes:
        loss: surrogate whose gradient w.r.t. the input ``x`` is ``grad / B``; its value
            (0.5·‖grad‖²/B) is not a meaningful objective, only its gradient is.
        grad: the distilled gradient w(t)·(ε̂ − ε_target), detached, same shape as ``x``.
        t: the timesteps used, shape ``[B]``.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    t: torch.Tensor


def finalize_gradient(grad: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """Replace NaN/inf by finite numbers and clamp element-wise to [−c, c] when ``grad_clip`` is set."""
    grad = torch.nan_to_num(grad)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad.detach()


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − (x − grad).detach()‖²/B, so that ∂loss/∂x = grad/B.

    This keeps Lightning's automatic optimization unchanged: ``training_step`` returns a scalar and
    ``backward`` carries the score-distillation gradient into the renderer.
    """
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="sum") / x.shape[0]


@dataclass
class NoisedSample:
    """A loss's input of one step before the denoiser sees it.

    Attributes:
        x: the differentiable input ``[B, …]``.
        t: its timesteps ``[B]``.
        noise: the noise ε added (float32).
        x_t: the noised input (float32, detached).
    """

    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor


def noised_sample(
    denoiser: Denoiser,
    timesteps: TimestepSchedule,
    x: torch.Tensor,
    global_step: int,
    generator: torch.Generator | None,
) -> NoisedSample:
    """Draw ``t`` and the noise (in that order, from ``generator``) and noise ``x`` to ``x_t`` (SDS, CSD, VSD)."""
    t = timesteps.sample(x.shape[0], global_step, denoiser.num_train_timesteps, x.device, generator)
    noise = randn_like(x.detach().float(), generator)
    with torch.no_grad():
        x_t = add_noise(denoiser.alphas_cumprod, x.detach().float(), noise, t)
    return NoisedSample(x=x, t=t, noise=noise, x_t=x_t)


def weighted_distillation(
    x: torch.Tensor,
    t: torch.Tensor,
    direction: torch.Tensor,
    denoiser: Denoiser,
    weighting: Weighting,
    grad_clip: ScalarSchedule | None,
    global_step: int,
) -> DistillationOutput:
    """The gradient w(t)·``direction`` (clamped by ``grad_clip`` at ``global_step``) and its surrogate loss."""
    weight = timestep_weight(weighting, denoiser.alphas_cumprod, t).view(-1, *([1] * (x.dim() - 1)))
    clip = None if grad_clip is None else scalar_at(grad_clip, global_step)
    grad = finalize_gradient(weight * direction, clip)
    return DistillationOutput(loss=surrogate_loss(x, grad), grad=grad, t=t)


class DistillationSettings(Protocol):
    """What :class:`ScoreDistillation` reads from a method's config (``SDSConfig``, ``ASDConfig``, ``CSDConfig``).

    Attributes:
        timesteps: t range and its annealing.
        weighting: w(t).
        grad_clip: element-wise clamp of the gradient (a scalar schedule), or None.
    """

    timesteps: TimestepSchedule
    weighting: Weighting
    grad_clip: ScalarSchedule | None


ConfigT = TypeVar("ConfigT", bound=DistillationSettings)


class ScoreDistillation(ABC, Generic[ConfigT]):
    """A score distillation on one :class:`Denoiser`: noise ``x``, get a direction from the denoiser, weight it.

    A method says two things: :attr:`config_class` (its settings, built with their defaults when no config is
    given) and :meth:`direction`, its math. Calling it is :meth:`noised`, :meth:`direction` (without gradient)
    and :meth:`distill_direction` in a row; a method that draws more than t and ε overrides :meth:`noised` to
    return its own :class:`NoisedSample`, which :meth:`direction` then receives.
    """

    config_class: ClassVar[Callable[[], Any]]

    def __init__(self, denoiser: Denoiser, config: ConfigT | None = None) -> None:
        self.denoiser = denoiser
        self.config: ConfigT = config if config is not None else self.config_class()

    def __call__(
        self,
        x: torch.Tensor,
        condition: Any,
        uncondition: Any = None,
        *,
        global_step: int = 0,
        generator: torch.Generator | None = None,
    ) -> DistillationOutput:
        """Distill the denoiser's score into ``x`` ([B, …], differentiable; the denoiser's space).

        Every draw (``t``, the noise, and a method's own, in its fixed order) comes from ``generator`` when
        given, otherwise from the global torch RNG.
        """
        sample = self.noised(x, global_step=global_step, generator=generator)
        with torch.no_grad():
            direction = self.direction(sample, condition, uncondition)
        return self.distill_direction(sample, direction, global_step=global_step)

    def noised(
        self, x: torch.Tensor, *, global_step: int = 0, generator: torch.Generator | None = None
    ) -> NoisedSample:
        """Draw ``t`` and the noise (in that order, from ``generator``) and noise ``x`` to ``x_t``."""
        return noised_sample(self.denoiser, self.config.timesteps, x, global_step, generator)

    @abstractmethod
    def direction(self, sample: NoisedSample, condition: Any, uncondition: Any) -> torch.Tensor:
        """The method's unweighted direction for ``sample`` (float32, shape of ``sample.x``; run without
        gradient)."""

    def distill_direction(
        self, sample: NoisedSample, direction: torch.Tensor, *, global_step: int = 0
    ) -> DistillationOutput:
        """The gradient w(t)·``direction`` of ``sample`` (clamped by ``grad_clip``) and its surrogate loss."""
        cfg = self.config
        return weighted_distillation(
            sample.x, sample.t, direction, self.denoiser, cfg.weighting, cfg.grad_clip, global_step
        )
