"""Random training cameras indexed by the optimizer step, and the turntable used for evaluation.

Step s always yields the same batch: ``RandomCameraDataset[s]`` draws every random number of the batch
(pose, field of view, perturbations, light) from a ``torch.Generator`` seeded by a pure function of
``(seed, s)``; it never touches the global RNG and does not depend on call order or on which process
asks. Progressive schedules (resolution and batch-size milestones, widening elevation/azimuth ranges)
are functions of s as well. This is what lets a Picard window evaluate step s on any rank, any number
of times. Sampling follows threestudio's ``random-camera-datamodule`` (defaults included).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from recipes.data.cameras import Cameras, look_at, orbit_cameras, spherical_to_cartesian

SEED_STRIDE = 1_000_003


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, step)``."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + step)


@dataclass
class RandomCameraConfig:
    """Settings of the random training cameras (threestudio names and defaults; angles in degrees).

    ``height``, ``width`` and ``batch_size`` are one value or one value per phase, the phases starting
    at the steps in ``resolution_milestones`` (so lists have ``len(resolution_milestones) + 1`` items).

    ``elevation_choices`` / ``azimuth_choices`` (not in threestudio): when set, each view's nominal
    elevation / azimuth is drawn uniformly from these values instead of from the range (the
    perturbations still apply). With a prior that only knows a grid of posed views, such as the
    closed-form prior (elevations −10, 20, 50; azimuths 0, 30, …, 330), this trains exactly at the
    poses it knows. Default is ``None`` (continuous ranges), which leaves every draw as before.
    """

    height: int | list[int] = 64
    width: int | list[int] = 64
    batch_size: int | list[int] = 1
    resolution_milestones: list[int] = field(default_factory=list)
    elevation_range: tuple[float, float] = (-10.0, 90.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    camera_distance_range: tuple[float, float] = (1.0, 1.5)
    fovy_range: tuple[float, float] = (40.0, 70.0)
    camera_perturb: float = 0.1
    center_perturb: float = 0.2
    up_perturb: float = 0.02
    light_position_perturb: float = 1.0
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    light_sample_strategy: Literal["dreamfusion", "magic3d"] = "dreamfusion"
    batch_uniform_azimuth: bool = True
    progressive_until: int = 0
    elevation_choices: list[float] | None = None
    azimuth_choices: list[float] | None = None
    eval_elevation_deg: float = 15.0
    eval_camera_distance: float = 1.5
    eval_fovy_deg: float = 70.0

    def __post_init__(self) -> None:
        phases = len(self.resolution_milestones) + 1
        for name in ("height", "width", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != phases:
                raise ValueError(f"{name} has {len(value)} values but resolution_milestones defines {phases}")
        if list(self.resolution_milestones) != sorted(self.resolution_milestones):
            raise ValueError("resolution_milestones must be increasing")
        for name in ("elevation_choices", "azimuth_choices"):
            choices = getattr(self, name)
            if choices is not None and len(choices) == 0:
                raise ValueError(
                    f"{name} is empty: give at least one angle in degrees, or None for the range"
                )

    def _phase_value(self, value: int | list[int], step: int) -> int:
        if isinstance(value, int):
            return value
        return value[bisect.bisect_right(self.resolution_milestones, step)]

    def resolution_at(self, step: int) -> tuple[int, int]:
        """Image ``(height, width)`` used at ``step``."""
        return self._phase_value(self.height, step), self._phase_value(self.width, step)

    def batch_size_at(self, step: int) -> int:
        """Number of views in the batch of ``step``."""
        return self._phase_value(self.batch_size, step)

    def ranges_at(self, step: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """Elevation and azimuth ranges at ``step``, widened linearly from the eval view until ``progressive_until``."""
        if self.progressive_until <= 0:
            return self.elevation_range, self.azimuth_range
        r = min(1.0, step / self.progressive_until)
        e0 = self.eval_elevation_deg
        elevation = ((1 - r) * e0 + r * self.elevation_range[0], (1 - r) * e0 + r * self.elevation_range[1])
        azimuth = (r * self.azimuth_range[0], r * self.azimuth_range[1])
        return elevation, azimuth


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _choice(generator: torch.Generator, n: int, values: list[float]) -> Tensor:
    index = torch.randint(0, len(values), (n,), generator=generator)
    return torch.tensor([float(v) for v in values])[index]


def sample_random_cameras(config: RandomCameraConfig, step: int, generator: torch.Generator) -> Cameras:
    """Draw the camera batch of ``step`` from ``generator`` (the only source of randomness)."""
    n = config.batch_size_at(step)
    height, width = config.resolution_at(step)
    (elev_lo, elev_hi), (azim_lo, azim_hi) = config.ranges_at(step)

    if config.elevation_choices is not None:
        elevation = _choice(generator, n, config.elevation_choices)
    elif torch.rand((), generator=generator) < 0.5:  # uniform in degrees (favours the poles)
        elevation = _uniform(generator, n, elev_lo, elev_hi)
    else:  # uniform on the sphere band: sin(elevation) uniform
        sin_lo, sin_hi = math.sin(math.radians(elev_lo)), math.sin(math.radians(elev_hi))
        elevation = torch.rad2deg(torch.asin(_uniform(generator, n, sin_lo, sin_hi)))
    if config.azimuth_choices is not None:
        azimuth = _choice(generator, n, config.azimuth_choices)
    elif config.batch_uniform_azimuth:  # one azimuth per stratum of the range
        strata = (torch.rand(n, generator=generator) + torch.arange(n)) / n
        azimuth = azim_lo + (azim_hi - azim_lo) * strata
    else:
        azimuth = _uniform(generator, n, azim_lo, azim_hi)
    distance = _uniform(generator, n, *config.camera_distance_range)
    fovy_deg = _uniform(generator, n, *config.fovy_range)

    positions = spherical_to_cartesian(elevation, azimuth, distance)
    positions = positions + config.camera_perturb * (2 * torch.rand(n, 3, generator=generator) - 1)
    center = config.center_perturb * torch.randn(n, 3, generator=generator)
    up = torch.tensor([0.0, 0.0, 1.0]) + config.up_perturb * torch.randn(n, 3, generator=generator)
    c2w = look_at(positions, center, torch.nn.functional.normalize(up, dim=-1))

    light_distance = _uniform(generator, n, *config.light_distance_range)
    if config.light_sample_strategy == "dreamfusion":
        jitter = config.light_position_perturb * torch.randn(n, 3, generator=generator)
        light_direction = torch.nn.functional.normalize(positions + jitter, dim=-1)
        light_positions = light_direction * light_distance[:, None]
    elif config.light_sample_strategy == "magic3d":
        local_z = torch.nn.functional.normalize(positions, dim=-1)
        local_x = torch.stack([local_z[:, 1], -local_z[:, 0], torch.zeros(n)], dim=-1)
        local_x = torch.nn.functional.normalize(local_x, dim=-1)
        local_y = torch.linalg.cross(local_z, local_x, dim=-1)
        light_azimuth = 2 * math.pi * torch.rand(n, generator=generator)
        light_elevation = math.pi / 6 + (math.pi / 3) * torch.rand(n, generator=generator)
        local = torch.stack(
            [
                torch.cos(light_elevation) * torch.cos(light_azimuth),
                torch.cos(light_elevation) * torch.sin(light_azimuth),
                torch.sin(light_elevation),
            ],
            dim=-1,
        )
        frame = torch.stack([local_x, local_y, local_z], dim=-1)
        light_positions = torch.einsum("bij,bj->bi", frame, local) * light_distance[:, None]
    else:
        raise ValueError(f"unknown light_sample_strategy {config.light_sample_strategy!r}")

    return Cameras(
        c2w=c2w,
        fovy=torch.deg2rad(fovy_deg),
        height=height,
        width=width,
        elevation_deg=elevation,
        azimuth_deg=azimuth,
        distance=distance,
        light_positions=light_positions,
    )


class RandomCameraDataset(Dataset[Cameras]):
    """Map-style dataset whose item s is the whole camera batch of optimizer step s."""

    def __init__(self, config: RandomCameraConfig, seed: int, num_steps: int) -> None:
        self.config = config
        self.seed = seed
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> Cameras:
        if not 0 <= step < self.num_steps:
            raise IndexError(step)
        return sample_random_cameras(self.config, step, step_generator(self.seed, step))


class TurntableDataset(Dataset[Cameras]):
    """Fixed evaluation views; item i is a batch holding view i."""

    def __init__(self, cameras: Cameras) -> None:
        self.cameras = cameras

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, index: int) -> Cameras:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.cameras[index]


def step_indexed_loader(dataset: Dataset[Cameras]) -> DataLoader:
    """The only safe loader for step-indexed batches: in-process, in order, no re-batching."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0, collate_fn=_identity)


class _ResumableSteps(Sampler[int]):
    """The indices ``0 … n − 1``, the first pass from ``start``; a new pass starts at 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.start = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.n))


class ResumableStepLoader(DataLoader):
    """The training loader of step-indexed batches, resumable: its state is the next step to run, so a fit resumed
    from a checkpoint goes on with that step's batch (Lightning would restart a plain loader at batch 0, and a
    sequential run resumed mid-run would then repeat the first steps' cameras).

    Args:
        dataset: item ``s`` is the whole batch of step ``s``.
        datamodule: the data module whose trainer's ``global_step`` is the step the next batch is for (at a
            checkpoint, under Picard too, the steps taken so far). Default is ``None``: step 0.
    """

    def __init__(self, dataset: Dataset[Cameras], datamodule: pl.LightningDataModule | None = None) -> None:
        self._datamodule = datamodule
        super().__init__(
            dataset,
            batch_size=None,
            sampler=_ResumableSteps(len(dataset)),  # type: ignore[arg-type]
            num_workers=0,
            collate_fn=_identity,
        )

    def state_dict(self) -> dict[str, int]:
        """``{"next_step": …}``: what Lightning saves in a checkpoint for this loader."""
        trainer = self._datamodule.trainer if self._datamodule is not None else None
        return {"next_step": trainer.global_step if trainer is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next pass at the checkpoint's step (within the epoch of ``len(dataset)`` steps)."""
        self.sampler.start = int(state["next_step"]) % len(self.dataset)  # type: ignore[attr-defined, arg-type]


def _identity(batch: Cameras) -> Cameras:
    return batch


class RandomCameraDataModule(pl.LightningDataModule):
    """Random cameras for training, a turntable for validation (``n_val_views``) and test (``n_test_views``).

    ``num_steps`` must be at least ``trainer.max_steps``: the training set is one epoch of step-indexed
    batches, and a second epoch would restart at step 0.
    """

    def __init__(
        self,
        cameras: RandomCameraConfig | None = None,
        seed: int = 0,
        num_steps: int = 10_000,
        eval_height: int = 512,
        eval_width: int = 512,
        n_val_views: int = 1,
        n_test_views: int = 120,
    ) -> None:
        super().__init__()
        self.config = cameras if cameras is not None else RandomCameraConfig()
        self.seed = seed
        self.num_steps = num_steps
        self.eval_height = eval_height
        self.eval_width = eval_width
        self.n_val_views = n_val_views
        self.n_test_views = n_test_views

    def _turntable(self, n: int) -> Cameras:
        return orbit_cameras(
            n,
            elevation_deg=self.config.eval_elevation_deg,
            distance=self.config.eval_camera_distance,
            fovy_deg=self.config.eval_fovy_deg,
            height=self.eval_height,
            width=self.eval_width,
        )

    def train_dataloader(self) -> DataLoader:
        return ResumableStepLoader(RandomCameraDataset(self.config, self.seed, self.num_steps), self)

    def val_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_val_views)))

    def test_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_test_views)))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
