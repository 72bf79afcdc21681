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
from typing import Literal

import torch
from torch import Tensor, nn

from recipes.geometry.sdf import ImplicitSDF, ImplicitSDFConfig
from recipes.render.background import NeuralEnvironmentMapConfig, SolidColorConfig
from recipes.render.materials import DiffusePointLightConfig, NoMaterialConfig
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.system.nerf_scene import NeRFScene


@dataclass
class SDFOptimizer:
    """Adam over the SDF scene's parts, each with its own learning rate (threestudio's TextMesh).

    Attributes:
        encoding_lr: the hash grid. Default is 0.01.
        sdf_network_lr: the MLP that decodes the signed distance. Default is 0.001.
        feature_network_lr: the MLP that decodes the material features. Default is 0.001.
        background_lr: a learned background. Default is 0.001.
        variance_lr: NeuS's learned sharpness. Default is 0.001.
        betas: Adam's betas. Default is (0.9, 0.99).
        eps: Adam's epsilon. Default is 1e-15.
    """

    encoding_lr: float = 0.01
    sdf_network_lr: float = 0.001
    feature_network_lr: float = 0.001
    background_lr: float = 0.001
    variance_lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15


class SDFScene(NeRFScene):
    """SDF (hash grid + MLPs, sphere init) + material + background, rendered by NeuS.

    Args:
        field: the SDF field. Default is threestudio's ``implicit-sdf`` as TextMesh configures it (sphere of
            radius 0.5, progressive finite-difference normals).
        material: ``"diffuse"`` or ``"none"``. Default is ``"diffuse"``.
        diffuse: settings of the diffuse material. Default is threestudio's.
        unlit: settings of the unlit material. Default is sigmoid colour.
        background: ``"solid"`` or ``"environment"``. Default is ``"environment"``.
        solid: the solid background. Default is white.
        environment: the learned environment map. Default is threestudio's.
        renderer: samples per ray, occupancy grid, NeuS variance and cosine annealing. Default is threestudio's
            ``neus-volume-renderer`` without annealing (TextMesh anneals over all its steps: set
            ``cos_anneal_end_steps`` to ``trainer.max_steps``).
        optimizer: learning rates per part. Default is TextMesh's.
    """

    def __init__(
        self,
        field: ImplicitSDFConfig | None = None,
        material: Literal["diffuse", "none"] = "diffuse",
        diffuse: DiffusePointLightConfig | None = None,
        unlit: NoMaterialConfig | None = None,
        background: Literal["solid", "environment"] = "environment",
        solid: SolidColorConfig | None = None,
        environment: NeuralEnvironmentMapConfig | None = None,
        renderer: NeuSRendererConfig | None = None,
        optimizer: SDFOptimizer | None = None,
    ) -> None:
        super().__init__(
            field=field,  # type: ignore[arg-type]  (built by build_renderer below)
            material=material,
            diffuse=diffuse,
            unlit=unlit,
            background=background,
            solid=solid,
            environment=environment,
            renderer=renderer,
        )
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
        cfg = self.sdf_optimizer
        geometry = self.geometry
        parts = {
            "encoding": (geometry.encoding, cfg.encoding_lr),
            "sdf_network": (geometry.sdf_network, cfg.sdf_network_lr),
            "feature_network": (geometry.feature_network, cfg.feature_network_lr),
            "variance": (self.renderer.variance, cfg.variance_lr),
            "background": (self.renderer.background, cfg.background_lr),
        }
        groups = []
        for name, (module, lr) in parts.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr, "name": name})
        return torch.optim.Adam(groups, betas=cfg.betas, eps=cfg.eps), None


__all__ = ["SDFOptimizer", "SDFScene"]
