"""3D Gaussians as a :class:`~recipes.system.scene.Scene`: DreamGaussian's stage 1 (splatting, densify/prune).

Densification runs between optimizer steps on the screen-space statistics of the step's last rendered view,
as DreamGaussian does: ``render`` records that view's projected-mean gradient (in NDC units) and radii in two
buffers, which the module declares as Picard step outputs, and :meth:`GaussianScene.after_optimizer_step`
folds them into the density statistics and densifies, prunes or resets opacity on the schedule. Under Picard
that hook runs in the replay, so a 2-rank run at threshold 0 equals the sequential run through every resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.export.mesh import GaussianColorField, GaussianDensityField, export_mesh, marching_cubes
from recipes.geometry.gaussian_density_control import (
    DensificationSchedule,
    GaussianDensityControl,
    resize_report,
)
from recipes.geometry.gaussians import GaussianLearningRates, Gaussians, resize_rows_to_state_dict
from recipes.render.gaussians_raster import GaussianBackend, render_gaussians, resolve_backend
from recipes.system.scene import Scene

SCREEN_OUTPUTS = ("screen_grad", "screen_radii")


@dataclass
class GaussianInit:
    """How the Gaussians start. Defaults are DreamGaussian's (5000 points in a ball of radius 0.5, opacity 0.1).

    Attributes:
        num_points: initial number of Gaussians. Default is 5000.
        radius: the initial points are uniform in a ball of this radius. Default is 0.5.
        opacity: initial opacity of every Gaussian. Default is 0.1.
        color: RGB value in [0, 1] of every initial Gaussian, or None for DreamGaussian's random near-black
            colours. Grey (0.5) starts far closer to most objects on a white background. Default is None.
        seed: seed of the initialisation (positions, colours). Default is 0.
    """

    num_points: int = 5000
    radius: float = 0.5
    opacity: float = 0.1
    color: float | None = None
    seed: int = 0


class GaussianScene(Scene):
    """DreamGaussian's 3D Gaussians, splatted over a solid background, densified between optimizer steps.

    Args:
        init: initial Gaussians. Default is DreamGaussian's.
        learning_rates: Adam learning rates and the position schedule. Default is DreamGaussian's text.yaml.
        densification: when to densify, prune and reset opacity. Default is DreamGaussian's text.yaml.
        background: RGB in [0, 1] behind the Gaussians. Default is white (the closed-form prior's references
            have a white background).
        backend: ``"torch"`` (any device), ``"gsplat"`` (CUDA) or ``"auto"``. Default is ``"auto"``.
        mesh_level: iso-level of the opacity-weighted density for mesh export (DreamGaussian: 1). Default is 1.
        mesh_radius: half-size of the export box. Default is 1.
    """

    screen_grad: Tensor
    screen_radii: Tensor

    def __init__(
        self,
        init: GaussianInit | None = None,
        learning_rates: GaussianLearningRates | None = None,
        densification: DensificationSchedule | None = None,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        backend: GaussianBackend = "auto",
        mesh_level: float = 1.0,
        mesh_radius: float = 1.0,
    ) -> None:
        super().__init__()
        self.init = init = init if init is not None else GaussianInit()
        if init.num_points < 1:
            raise ValueError(f"GaussianInit.num_points must be at least 1, got {init.num_points}")
        self.learning_rates = learning_rates if learning_rates is not None else GaussianLearningRates()
        self.gaussians = Gaussians(
            init.num_points, init.radius, init.opacity, init.seed, init_color=init.color
        )
        self.density = GaussianDensityControl(densification or DensificationSchedule(), init.num_points)
        self.register_buffer("background", torch.tensor(background, dtype=torch.float32), persistent=False)
        self.register_buffer("screen_grad", torch.zeros(init.num_points, 2))
        self.register_buffer("screen_radii", torch.zeros(init.num_points))
        self.register_load_state_dict_pre_hook(resize_rows_to_state_dict)  # the step outputs' row count
        self.backend = backend
        self._recorded = False  # whether this step's render has recorded its screen statistics
        self.mesh_level = mesh_level
        self.mesh_radius = mesh_radius

    def check_device(self, device: torch.device) -> None:
        if self.backend == "gsplat" and device.type != "cuda":
            raise ValueError(
                f"scene backend 'gsplat' renders on CUDA only, but this run is on {device.type}; "
                "set scene.init_args.backend to 'torch' (or 'auto')"
            )
        resolve_backend(self.backend, device)

    def render(self, cameras: Cameras, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out = render_gaussians(self.gaussians, cameras, self.background, backend=self.backend)
        if self.training and out.means2d.requires_grad and not self._recorded:
            self._recorded = (
                True  # a step's statistics are its first training render's (DreamGaussian's view)
            )
            self.screen_radii.copy_(out.radii[-1])
            scale = torch.tensor([0.5 * cameras.width, 0.5 * cameras.height], device=out.means2d.device)

            target = self.screen_grad  # this evaluation's buffer (a slot's own in a batched evaluation)

            def record(grad: Tensor) -> None:  # runs in the backward of the step
                target.copy_(grad[-1] * scale)

            out.means2d.register_hook(record)
        background = self.background.to(out.rgb.dtype).expand_as(out.rgb)
        return {"comp_rgb": out.rgb, "comp_rgb_bg": background, "opacity": out.alpha, "depth": out.depth}

    def prepare_step(self, step: int) -> None:
        self._recorded = False

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        return self.gaussians.configure_optimizer(self.learning_rates)

    def picard_buffers(self, prefix: str) -> dict[str, bool]:
        # The statistics only steer the replay's densifications, never a render: not counted in the error.
        return self.density.statistics_buffers(f"{prefix}density.", in_error=False)

    def picard_step_outputs(self, prefix: str) -> list[str]:
        return [prefix + name for name in SCREEN_OUTPUTS]

    @torch.no_grad()
    def after_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer, prefix: str
    ) -> dict[str, Tensor] | None:
        completed = step + 1  # DreamGaussian counts completed steps from 1
        self.density.observe(completed, self.screen_grad, self.screen_radii, width=2, height=2)
        changes = self.density.after_optimizer_step(self.gaussians, optimizer, completed)
        report = resize_report(
            changes, f"{prefix}gaussians.", f"{prefix}density.", also=self.picard_step_outputs(prefix)
        )
        if report:
            n = len(self.gaussians)
            self.screen_grad = self.screen_grad.new_zeros(n, 2)
            self.screen_radii = self.screen_radii.new_zeros(n)
        return report

    @torch.no_grad()
    def export_mesh(self, stem: Path, resolution: int = 128, texture_size: int | None = 512) -> list[Path]:
        mesh = marching_cubes(
            GaussianDensityField(self.gaussians), resolution, self.mesh_radius, level=self.mesh_level
        )
        if mesh.faces.shape[0] == 0:
            raise ValueError(
                f"the Gaussians' density never reaches mesh_level={self.mesh_level} inside the export box "
                f"(radius {self.mesh_radius}); lower scene.init_args.mesh_level"
            )
        color = GaussianColorField(self.gaussians)
        stem = Path(stem)
        return [
            export_mesh(stem.with_suffix(".obj"), mesh, color, texture_size=texture_size),
            export_mesh(stem.with_suffix(".glb"), mesh, color),
        ]


__all__ = ["GaussianInit", "GaussianScene"]
