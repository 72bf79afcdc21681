"""What the shared system asks of a 3D representation: a :class:`Scene`.

A scene owns everything that is optimised (parameters, their optimizer and schedule) and everything that
changes between optimizer steps (occupancy grids, densification statistics, the number of Gaussians). The
system (:class:`recipes.system.TextTo3D`) only renders it, distils guidance into the render and forwards the
Picard hooks, so adding a representation means one small subclass and no other code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from recipes.data.cameras import Cameras


class Scene(nn.Module):
    """Base class of the representations the system optimises.

    Subclasses implement :meth:`render`, :meth:`configure_optimizers` and :meth:`export_mesh`; the Picard hooks
    default to "nothing between steps". Renders are dictionaries in threestudio's names with images
    ``[B, H, W, C]``: at least ``comp_rgb`` (colour over the background, in [0, 1]) and ``opacity``.
    """

    def render(self, cameras: Cameras, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Render ``cameras``; in training mode random choices (shading, ray offsets) come from ``generator``."""
        raise NotImplementedError

    def prepare_step(self, step: int) -> None:
        """Set what is a pure function of the step before rendering it (progressive masks, shading phases).

        Default is nothing. Never keep state across steps here: that belongs in :meth:`after_optimizer_step`.
        """

    def configure_optimizers(
        self,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer over this scene's parameters and an optional per-step LR scheduler."""
        raise NotImplementedError

    def picard_buffers(self, prefix: str) -> dict[str, bool]:
        """Step-dependent buffers (names under ``prefix``) and whether they count in Picard's error. Default is none."""
        return {}

    def picard_step_outputs(self, prefix: str) -> list[str]:
        """Buffers written by the render of a step for the step hook. Default is none."""
        return []

    def after_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer, prefix: str
    ) -> dict[str, Tensor] | None:
        """Work between optimizer steps (after the optimizer step of ``step``); return the resize report.

        Runs in :meth:`TextTo3D.picard_after_optimizer_step`: in the Picard replay, or through
        :class:`lightning_picard.StepSeed` in a sequential run. Default is nothing.
        """
        return None

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if this scene cannot render ``height × width``. Default accepts any size ≥ 1."""
        if height < 1 or width < 1:
            raise ValueError(f"render resolution must be positive, got {height}x{width}")

    def check_device(self, device: torch.device) -> None:
        """Raise ``ValueError`` if a backend this scene was configured with cannot run on ``device``. Default accepts any."""

    def init_from(self, previous: Scene) -> None:
        """Start from ``previous``, the trained scene of an earlier stage (``--model.init_from``).

        Runs once before the first optimizer step of a fresh fit, on every rank. Raise ``ValueError`` saying
        which representations this scene starts from when ``previous`` is not one. Default refuses any.
        """
        raise ValueError(
            f"a {type(self).__name__} cannot start from another run's scene ({type(previous).__name__}); "
            "remove model.init_from"
        )

    @torch.no_grad()
    def export_mesh(self, stem: Path, resolution: int = 128, texture_size: int | None = 512) -> list[Path]:
        """Write the object as ``stem.obj`` (textured when ``texture_size`` is set) and ``stem.glb``."""
        raise NotImplementedError
