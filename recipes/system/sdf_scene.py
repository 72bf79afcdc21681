"""A signed-distance field rendered by NeuS as a :class:`~recipes.system.scene.Scene`: TextMesh's coarse stage.

Everything but the field and its opacity is the NeRF scene's (material, background, occupancy grid refreshed
between optimizer steps, progressive hash-grid levels, mesh export): :class:`SDFScene` swaps the field for
:class:`~recipes.geometry.sdf.ImplicitSDF` (a sphere of radius ``sphere_radius`` at initialisation, from its
``sdf_bias``) and the renderer for :class:`~recipes.render.neus.NeuSRenderer`, whose outputs carry
``sdf_gradient`` for the ``eikonal`` regularizer. The NeuS cosine annealing is a pure function of the step
(:meth:`SDFScene.prepare_step`). The mesh is the zero level set of the SDF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from recipes.geometry.sdf import ImplicitSDF, ImplicitSDFConfig
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.system.nerf_scene import NeRFScene
from recipes.system.optimizer import AdamSettings


@dataclass
class SDFOptimizer(AdamSettings):
    """Adam over the SDF scene's parts, each with its own learning rate (threestudio's TextMesh).

    Attributes:
        encoding_lr: the hash grid. Default is 0.01.
        sdf_network_lr: the MLP that decodes the signed distance. Default is 0.001.
        feature_network_lr: the MLP that decodes the material features. Default is 0.001.
        background_lr: a learned background. Default is 0.001.
        variance_lr: NeuS's learned sharpness. Default is 0.001.
    """

    encoding_lr: float = 0.01
    sdf_network_lr: float = 0.001
    feature_network_lr: float = 0.001
    background_lr: float = 0.001
    variance_lr: float = 0.001


class SDFScene(NeRFScene):
    """SDF (hash grid + MLPs, sphere init) + material + background, rendered by NeuS.

    Args:
        field: the SDF field. Default is threestudio's ``implicit-sdf`` as TextMesh configures it (sphere of
            radius 0.5, progressive finite-difference normals).
        renderer: samples per ray, occupancy grid, NeuS variance and cosine annealing. Default is threestudio's
            ``neus-volume-renderer`` without annealing (TextMesh anneals over all its steps: set
            ``cos_anneal_end_steps`` to ``trainer.max_steps``).
        optimizer: learning rates per part. Default is TextMesh's.
        **appearance: ``material``, ``diffuse``, ``unlit``, ``background``, ``solid``, ``environment`` as for
            :class:`~recipes.system.NeRFScene`.
    """

    def __init__(
        self,
        field: ImplicitSDFConfig | None = None,
        renderer: NeuSRendererConfig | None = None,
        optimizer: SDFOptimizer | None = None,
        **appearance: Any,
    ) -> None:
        super().__init__(field=field, renderer=renderer, **appearance)  # type: ignore[arg-type]
        self.sdf_optimizer = optimizer if optimizer is not None else SDFOptimizer()

    def build_renderer(
        self,
        field: ImplicitSDFConfig | None,
        material: nn.Module,
        background: nn.Module,
        renderer: NeuSRendererConfig | None,
    ) -> NeuSRenderer:
        return NeuSRenderer(ImplicitSDF(field), material, background, renderer)

    @property
    def geometry(self) -> ImplicitSDF:
        return self.renderer.geometry

    def surface(self) -> tuple[Callable[[Tensor], Tensor], float]:
        """The signed distance and its zero level."""
        return self.geometry.sdf, 0.0

    def prepare_step(self, step: int) -> None:
        super().prepare_step(step)
        self.renderer.anneal(step)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        cfg, geometry = self.sdf_optimizer, self.geometry
        groups = {
            "encoding": (geometry.encoding.parameters(), cfg.encoding_lr),
            "sdf_network": (geometry.sdf_network.parameters(), cfg.sdf_network_lr),
            "feature_network": (geometry.feature_network.parameters(), cfg.feature_network_lr),
            "variance": (self.renderer.variance.parameters(), cfg.variance_lr),
            "background": (self.renderer.background.parameters(), cfg.background_lr),
        }
        return cfg.build(groups), None


__all__ = ["SDFOptimizer", "SDFScene"]
