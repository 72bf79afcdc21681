"""A NeRF (hash grid + MLPs) as a :class:`~recipes.system.scene.Scene`: DreamFusion's representation.

The occupancy grid that skips empty space is state that changes between optimizer steps: it is refreshed in
:meth:`NeRFScene.after_optimizer_step` (the Picard replay, or :class:`lightning_picard.StepSeed` in a
sequential run) from the parameters after the step, and declared as a Picard buffer so every guess carries its
own. Progressive hash-grid levels and the ambient-only shading phase are pure functions of the step
(:meth:`NeRFScene.prepare_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recipes.data.cameras import Cameras
from recipes.export.mesh import export_mesh, marching_cubes
from recipes.geometry.nerf import ImplicitVolume, ImplicitVolumeConfig
from recipes.render.background import (
    NeuralEnvironmentMapBackground,
    NeuralEnvironmentMapConfig,
    SolidColorBackground,
    SolidColorConfig,
)
from recipes.render.materials import (
    DiffusePointLightConfig,
    DiffusePointLightMaterial,
    NoMaterial,
    NoMaterialConfig,
    albedo_activation,
)
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig
from recipes.system.optimizer import AdamSettings
from recipes.system.scene import Scene


@dataclass
class NeRFOptimizer(AdamSettings):
    """Adam(W) over the field and the background (threestudio's DreamFusion: Adam 0.01, background 0.001).

    Attributes:
        lr: learning rate of the field (hash grid and MLPs; only the hash grid with ``network_lr``). Default is 0.01.
        background_lr: learning rate of a learned background. Default is 0.001.
        network_lr: learning rate of the field's density and feature MLPs, apart from its hash grid (threestudio's
            ProlificDreamer: encoding 0.01, networks 0.001). Default is ``None``: the MLPs use ``lr``.
    """

    lr: float = 0.01
    background_lr: float = 0.001
    network_lr: float | None = None


class NeRFScene(Scene):
    """Density field + material + background, rendered by the volume renderer.

    Args:
        field: the hash-grid field. Default is threestudio's ``implicit-volume``.
        renderer: samples per ray, occupancy grid, backend. Default is threestudio's.
        optimizer: learning rates. Default is DreamFusion's.
        mesh_threshold: iso-density for mesh export, or ``"auto"`` (the mean of the grid's non-empty densities,
            threestudio's rule). Default is ``"auto"``.
        **appearance: ``material`` (``"diffuse"``: albedo lit by a point light, DreamFusion; ``"none"``: unlit
            colour) and its settings ``diffuse`` / ``unlit``, ``background`` (``"solid"`` or ``"environment"``, a
            learned environment map) and its settings ``solid`` / ``environment``
            (:func:`material_and_background`). Defaults are threestudio's diffuse material and environment map.
    """

    def __init__(
        self,
        field: ImplicitVolumeConfig | None = None,
        renderer: VolumeRendererConfig | None = None,
        optimizer: NeRFOptimizer | None = None,
        mesh_threshold: float | Literal["auto"] = "auto",
        **appearance: Any,
    ) -> None:
        super().__init__()
        shading, backdrop = material_and_background(**appearance)
        self.renderer = self.build_renderer(field, shading, backdrop, renderer)
        self.optimizer_config = optimizer if optimizer is not None else NeRFOptimizer()
        self.mesh_threshold = mesh_threshold

    def build_renderer(
        self, field: Any, material: nn.Module, background: nn.Module, renderer: Any
    ) -> VolumeRenderer:
        """The field and its renderer from their configs (a subclass renders another field)."""
        return VolumeRenderer(ImplicitVolume(field), material, background, renderer)

    @property
    def geometry(self) -> ImplicitVolume:
        return self.renderer.geometry

    def surface(self) -> tuple[Callable[[Tensor], Tensor], float | Literal["auto"]]:
        """The field whose level set is the object's surface, and that level (``"auto"`` for a density)."""
        return self.geometry.density, self.mesh_threshold

    def check_device(self, device: torch.device) -> None:
        backends = {
            "renderer": self.renderer.config.backend,
            "hash grid": self.geometry.config.encoding.backend,
        }
        for part, backend in backends.items():
            if backend not in ("torch", "auto") and device.type != "cuda":
                raise ValueError(
                    f"the {part} backend {backend!r} runs on CUDA only, but this run is on {device.type}; "
                    f"set it to 'torch' in the scene's config"
                )

    def render(self, cameras: Cameras, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out = self.renderer(cameras, generator=generator)
        return {key: value for key, value in out.items() if torch.is_tensor(value)}

    def prepare_step(self, step: int) -> None:
        for part in (self.renderer.geometry, self.renderer.material, self.renderer.background):
            if hasattr(part, "update_step"):
                part.update_step(step)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        cfg = self.optimizer_config
        geometry = self.renderer.geometry
        groups: dict[str, tuple[Any, float]] = {"geometry": (geometry.parameters(), cfg.lr)}
        if cfg.network_lr is not None:
            networks = [getattr(geometry, name, None) for name in ("density_network", "feature_network")]
            if not all(isinstance(network, nn.Module) for network in networks):
                raise ValueError(
                    f"optimizer.network_lr needs a field with density_network and feature_network MLPs; "
                    f"{type(geometry).__name__} has none. Remove network_lr (its MLPs then use lr)."
                )
            in_networks = {id(p) for network in networks for p in network.parameters()}
            groups = {
                "geometry": ([p for p in geometry.parameters() if id(p) not in in_networks], cfg.lr),
                "networks": ([p for network in networks for p in network.parameters()], cfg.network_lr),
            }
        groups["background"] = (self.renderer.background.parameters(), cfg.background_lr)
        return cfg.build(groups), None

    def picard_buffers(self, prefix: str) -> dict[str, bool]:
        names = [f"{prefix}renderer.occupancy_grid.{name}" for name in ("occupancy", "binary")]
        names += [
            f"{prefix}{name}" for name, _ in self.named_buffers() if name.endswith("band_mask")
        ]  # set by prepare_step inside the hook too
        return dict.fromkeys(names, False)

    @torch.no_grad()
    def after_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer, prefix: str
    ) -> dict[str, Tensor] | None:
        self.prepare_step(step + 1)  # the occupancy of step s + 1 is measured with step s + 1's field
        self.renderer.occupancy_grid.update(step + 1, self.renderer.occupancy_fn)
        return None

    @torch.no_grad()
    def export_mesh(self, stem: Path, resolution: int = 128, texture_size: int | None = 512) -> list[Path]:
        geometry = self.geometry
        field, level = self.surface()
        mesh = marching_cubes(field, resolution, geometry.radius, level=level)
        activation = getattr(self.renderer.material.config, "albedo_activation", "sigmoid")

        def color(points: Tensor) -> Tensor:
            features = geometry(points.to(next(geometry.parameters()).device)).features
            return albedo_activation(activation, features[..., :3])

        stem = Path(stem)
        return [
            export_mesh(stem.with_suffix(".obj"), mesh, color, texture_size=texture_size),
            export_mesh(stem.with_suffix(".glb"), mesh, color),
        ]


def material_and_background(
    material: Literal["diffuse", "none"] = "diffuse",
    diffuse: DiffusePointLightConfig | None = None,
    unlit: NoMaterialConfig | None = None,
    background: Literal["solid", "environment"] = "environment",
    solid: SolidColorConfig | None = None,
    environment: NeuralEnvironmentMapConfig | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The material and the background a scene's config names, each built from its settings.

    Args:
        material: ``"diffuse"`` (albedo lit by a point light) or ``"none"`` (unlit colour). Default is ``"diffuse"``.
        diffuse: settings of the diffuse material. Default is threestudio's.
        unlit: settings of the unlit material. Default is sigmoid colour.
        background: ``"solid"`` or ``"environment"`` (a learned environment map). Default is ``"environment"``.
        solid: the solid background. Default is white.
        environment: the learned environment map. Default is threestudio's.
    """
    shading = _choose(
        "material",
        material,
        {"diffuse": (DiffusePointLightMaterial, diffuse), "none": (NoMaterial, unlit)},
    )
    backdrop = _choose(
        "background",
        background,
        {
            "solid": (SolidColorBackground, solid),
            "environment": (NeuralEnvironmentMapBackground, environment),
        },
    )
    return shading, backdrop


def _choose(part: str, name: str, choices: dict[str, tuple[type[nn.Module], object]]) -> nn.Module:
    """Build the module ``choices[name]`` from its config, or say which names there are."""
    if name not in choices:
        raise ValueError(f"unknown {part} {name!r}; use one of {', '.join(map(repr, choices))}")
    module_class, config = choices[name]
    return module_class(config)


__all__ = ["NeRFOptimizer", "NeRFScene", "material_and_background"]
