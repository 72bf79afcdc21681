"""The cases of ``benchmarks/convergence.py``: small LightningModules with held-out outputs and a quality measure.

Each :class:`Case` builds a module (normal or ``hard``: higher learning rates, more frequent densification), a
one-batch-per-step loader, the module's held-out outputs (predictions or renders, compared between runs when
rows are not aligned after densification) and its quality against the ground truth.

- ``regression``: the demo's ``NoisyRegression`` (dropout, input noise, Adam, a step LR schedule).
- ``points``: the test suite's ``GrowingBumps`` (points cloned and pruned, an occupancy grid, counted buffers).
- ``gaussians``: 3D Gaussians on the closed-form prior at 32 × 32, SDS from random cameras, DreamGaussian
  learning rates, densify/prune from screen-space gradients (declared as step outputs).
- ``nerf``: a hash-grid NeRF (``recipes.geometry.nerf`` + ``recipes.render.volume``) with SDS on the prior.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_picard.demo import NoisyRegression, regression_loader
from recipes.data.procedural import held_out_cameras, spherical_cameras
from recipes.eval import novel_view_quality
from recipes.geometry.gaussian_density_control import (
    DensificationSchedule,
    GaussianDensityControl,
    resize_report,
)
from recipes.geometry.gaussians import GaussianLearningRates, Gaussians, resize_rows_to_state_dict
from recipes.geometry.hashgrid import HashGridConfig
from recipes.geometry.mlp import MLPConfig
from recipes.geometry.nerf import ImplicitVolume, ImplicitVolumeConfig
from recipes.guidance.closed_form import ClosedFormPrior
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
from recipes.render.background import SolidColorBackground
from recipes.render.gaussians_raster import render_gaussians
from recipes.render.materials import NoMaterial
from recipes.render.occupancy import OccupancyGridConfig
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig
from tests.toy_resizing import GrowingBumps

SIZE = 32
SCREEN_OUTPUTS = ("screen_grad", "screen_radii")


def step_loader(steps: int) -> DataLoader:
    """One dummy batch per step: the modules draw their randomness (cameras, noise) inside training_step."""
    return DataLoader(TensorDataset(torch.arange(steps, dtype=torch.float32)), batch_size=1)


def random_view() -> object:
    """One camera drawn from the global RNG (seeded per step by the strategy or StepSeed), around the object."""
    elevation = torch.rand(1) * 60 - 10
    azimuth = torch.rand(1) * 360
    return spherical_cameras(elevation, azimuth)


_PRIOR: ClosedFormPrior | None = None


def prior() -> ClosedFormPrior:
    """The closed-form prior of the procedural object at 32 × 32 (σ = 10° camera kernel), built once."""
    global _PRIOR
    if _PRIOR is None:
        _PRIOR = ClosedFormPrior.from_procedural_object(height=SIZE)
    return _PRIOR


class SDSGaussians(pl.LightningModule):
    """3D Gaussians distilled from the closed-form prior, densified and pruned on screen-space gradients."""

    def __init__(self, hard: bool = False, points: int = 48, steps: int = 100) -> None:
        super().__init__()
        self.gaussians = Gaussians(num_points=points, radius=0.6, init_opacity=0.3, seed=0)
        n = len(self.gaussians)
        self.lr_scale = 3.0 if hard else 1.0
        schedule = DensificationSchedule(
            interval=10 if hard else 25,
            opacity_reset_interval=10_000,
            grad_threshold=5.0,  # SDS gradients on this prior are large: 48 → ~120 Gaussians in 100 steps
            percent_dense=0.05,
            end_step=steps,
            max_screen_size=None,
        )
        self.density = GaussianDensityControl(schedule, num_points=n)
        self.register_buffer("screen_grad", torch.zeros(n, 2))
        self.register_buffer("screen_radii", torch.zeros(n))
        self.register_load_state_dict_pre_hook(resize_rows_to_state_dict)
        self.steps = steps
        self.sds = ScoreDistillationSampling(prior(), SDSConfig(guidance_scale=1.0))

    def picard_buffers(self) -> dict[str, bool]:
        return self.density.statistics_buffers("density.")

    def picard_step_outputs(self) -> list[str]:
        return list(SCREEN_OUTPUTS)

    def render(self, cameras) -> torch.Tensor:
        out = render_gaussians(self.gaussians, cameras, background=torch.ones(3))
        return out.rgb.permute(0, 3, 1, 2)

    def training_step(self, batch, batch_idx):
        cameras = random_view()
        out = render_gaussians(self.gaussians, cameras, background=torch.ones(3))
        self.screen_radii.copy_(out.radii[-1])
        out.means2d.register_hook(self._record_screen_gradient)
        image = out.rgb.permute(0, 3, 1, 2) * 2 - 1
        return self.sds(image, cameras, None, global_step=self.global_step).loss

    def _record_screen_gradient(self, grad: torch.Tensor) -> None:
        self.screen_grad.copy_(grad[-1])

    def configure_optimizers(self):
        s = self.lr_scale
        lrs = GaussianLearningRates(
            position_lr_init=1e-3 * s,
            position_lr_final=2e-5 * s,
            position_lr_max_steps=self.steps,
            spatial_lr_scale=1.0,
            feature_lr=0.01 * s,
            opacity_lr=0.05 * s,
            scaling_lr=0.005 * s,
            rotation_lr=0.005 * s,
        )
        optimizer, scheduler = self.gaussians.configure_optimizer(lrs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def picard_after_optimizer_step(self, step: int) -> dict[str, torch.Tensor]:
        g, density = self.gaussians, self.density
        density.observe(step + 1, self.screen_grad, self.screen_radii, SIZE, SIZE)
        changes = density.after_optimizer_step(g, self.optimizers(use_pl_optimizer=False), step + 1)
        report = resize_report(changes, "gaussians.", "density.", also=SCREEN_OUTPUTS)
        if report:
            self.screen_grad = self.screen_grad.new_zeros(len(g), 2)
            self.screen_radii = self.screen_radii.new_zeros(len(g))
        return report


class SDSNeRF(pl.LightningModule):
    """A small hash-grid NeRF (unlit colour, white background) distilled from the closed-form prior."""

    def __init__(self, hard: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        grid = HashGridConfig(n_levels=6, log2_hashmap_size=12, base_resolution=8, per_level_scale=1.5)
        field = ImplicitVolume(
            ImplicitVolumeConfig(
                radius=1.0, normal_type="none", encoding=grid, mlp=MLPConfig(n_neurons=32, n_hidden_layers=1)
            )
        )
        self.renderer = VolumeRenderer(
            field,
            NoMaterial(),
            SolidColorBackground(),
            VolumeRendererConfig(num_samples_per_ray=32, occupancy=OccupancyGridConfig(enabled=False)),
        )
        self.lr = 0.03 if hard else 0.01
        self.sds = ScoreDistillationSampling(prior(), SDSConfig(guidance_scale=1.0))

    def render(self, cameras) -> torch.Tensor:
        return self.renderer(cameras)["comp_rgb"].permute(0, 3, 1, 2)

    def training_step(self, batch, batch_idx):
        cameras = random_view()
        image = self.renderer(cameras)["comp_rgb"].permute(0, 3, 1, 2) * 2 - 1
        return self.sds(image, cameras, None, global_step=self.global_step).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.99), eps=1e-15)


@dataclass
class Case:
    """One benchmark case: how to build, feed, observe and judge it."""

    name: str
    steps: int
    build: Callable[[], pl.LightningModule]
    loader: Callable[[int], DataLoader]
    outputs: Callable[[pl.LightningModule], torch.Tensor]
    quality: Callable[[pl.LightningModule], float]
    quality_name: str


def _regression_points() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(123))
    return x, x.sum(dim=1, keepdim=True).sin()


@torch.no_grad()
def _regression_outputs(module: pl.LightningModule) -> torch.Tensor:
    module.eval()
    return module.net(_regression_points()[0])


def _regression_quality(module: pl.LightningModule) -> float:
    return (_regression_outputs(module) - _regression_points()[1]).square().mean().item()


def _bump_grid() -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-1, 1, 24)
    x = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return x, torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])


@torch.no_grad()
def _bump_outputs(module: pl.LightningModule) -> torch.Tensor:
    return module(_bump_grid()[0])


def _bump_quality(module: pl.LightningModule) -> float:
    return (_bump_outputs(module) - _bump_grid()[1]).square().mean().item()


@torch.no_grad()
def _render_outputs(module: pl.LightningModule) -> torch.Tensor:
    module.eval()
    return module.render(held_out_cameras()).clamp(0, 1)


def _render_quality(module: pl.LightningModule) -> float:
    module.eval()
    return novel_view_quality(module.render).psnr


def cases(steps: dict[str, int] | None = None) -> dict[str, Case]:
    """Every case, normal and ``-hard``, by name; ``steps`` overrides the number of steps of a base case."""
    steps = {"regression": 200, "points": 60, "gaussians": 100, "nerf": 50, **(steps or {})}
    out: dict[str, Case] = {}
    for hard in (False, True):
        suffix = "-hard" if hard else ""
        t = steps["regression"]
        out["regression" + suffix] = Case(
            "regression" + suffix,
            t,
            lambda hard=hard: NoisyRegression(lr=0.04 if hard else 0.01),
            regression_loader,
            _regression_outputs,
            _regression_quality,
            "MSE",
        )
        t = steps["points"]
        out["points" + suffix] = Case(
            "points" + suffix,
            t,
            lambda hard=hard: GrowingBumps(densify_every=3 if hard else 6, lr=0.15 if hard else 0.05),
            step_loader,
            _bump_outputs,
            _bump_quality,
            "MSE",
        )
        t = steps["gaussians"]
        out["gaussians" + suffix] = Case(
            "gaussians" + suffix,
            t,
            lambda hard=hard, t=t: SDSGaussians(hard=hard, steps=t),
            step_loader,
            _render_outputs,
            _render_quality,
            "PSNR",
        )
        t = steps["nerf"]
        out["nerf" + suffix] = Case(
            "nerf" + suffix,
            t,
            lambda hard=hard: SDSNeRF(hard=hard),
            step_loader,
            _render_outputs,
            _render_quality,
            "PSNR",
        )
    return out


def fidelity_ratio(picard: torch.Tensor, sequential: torch.Tensor, other_seed: torch.Tensor) -> float:
    """‖picard − sequential‖² over ‖other seed − sequential‖², on held-out outputs."""
    spread = (other_seed - sequential).square().mean().item()
    distance = (picard - sequential).square().mean().item()
    return distance / spread if spread > 0 else math.inf
