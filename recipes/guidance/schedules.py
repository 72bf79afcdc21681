"""Step-dependent scalars, diffusion-timestep sampling with its annealing, and loss weighting w(t).

Scalar schedules use threestudio's syntax so its configs port verbatim: a number is constant; a list
``[start_step, start_value, end_value, end_step]`` interpolates linearly between the two steps and is
constant outside them (``[5000, 0.98, 0.5, 5001]`` is a step change at 5000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from recipes.guidance.randomness import randint

ScalarSchedule = float | Sequence[float]
Weighting = Literal["sds", "uniform", "fantasia3d"]


def scalar_at(schedule: ScalarSchedule, global_step: int) -> float:
    """The value of ``schedule`` at ``global_step``."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    values = [float(v) for v in schedule]
    if len(values) == 3:
        values = [0.0, *values]
    if len(values) != 4:
        raise ValueError(
            f"a schedule is a number or [start_step, start_value, end_value, end_step], got {schedule}"
        )
    start_step, start_value, end_value, end_step = values
    if end_step <= start_step:
        raise ValueError(f"schedule {schedule}: end_step must be after start_step")
    progress = min(max((global_step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start_value + (end_value - start_value) * progress


@dataclass
class TimestepSchedule:
    """Range of diffusion timesteps t ~ U{min_step, …, max_step}, as fractions of the training schedule.

    Both bounds are scalar schedules of the global step (e.g. ProlificDreamer anneals the maximum with
    ``[5000, 0.98, 0.5, 5001]``, ScaleDreamer both bounds linearly over the run).

    ``deterministic_over_steps`` (DreamGaussian's ``anneal_timestep``): when set to the run length, t is
    not drawn but decays linearly, t = round((1 − step / deterministic_over_steps)·T), clipped to the
    range and shared by the whole batch.
    """

    min_step_percent: ScalarSchedule = 0.02
    max_step_percent: ScalarSchedule = 0.98
    deterministic_over_steps: int | None = None

    def range_at(self, global_step: int, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive integer bounds (min_step, max_step) at ``global_step``."""
        min_step = int(num_train_timesteps * scalar_at(self.min_step_percent, global_step))
        max_step = int(num_train_timesteps * scalar_at(self.max_step_percent, global_step))
        min_step = min(max(min_step, 0), num_train_timesteps - 1)
        max_step = min(max(max_step, min_step), num_train_timesteps - 1)
        return min_step, max_step

    def sample(
        self,
        batch_size: int,
        global_step: int,
        num_train_timesteps: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One timestep per batch element (int64, shape ``[batch_size]``)."""
        min_step, max_step = self.range_at(global_step, num_train_timesteps)
        if self.deterministic_over_steps is not None:
            progress = min(global_step / self.deterministic_over_steps, 1.0)
            t = min(max(round((1.0 - progress) * num_train_timesteps), min_step), max_step)
            return torch.full((batch_size,), t, dtype=torch.long, device=device)
        return randint(min_step, max_step + 1, (batch_size,), device, generator)


def timestep_weight(strategy: Weighting, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w(t) per batch element (float32, shape ``[B]``).

    ``sds``: 1 − ᾱ_t (DreamFusion); ``uniform``: 1; ``fantasia3d``: √ᾱ_t·(1 − ᾱ_t).
    """
    alpha_bar = alphas_cumprod.to(t.device)[t.long()].float()
    if strategy == "sds":
        return 1.0 - alpha_bar
    if strategy == "uniform":
        return torch.ones_like(alpha_bar)
    if strategy == "fantasia3d":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"unknown weighting {strategy!r}; expected 'sds', 'uniform' or 'fantasia3d'")
