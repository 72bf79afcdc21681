"""A DMTet mesh with a texture field as a :class:`~recipes.system.scene.Scene`: Magic3D's refine stage.

Every forward extracts the surface of the tet grid's SDF by marching tetrahedra
(:class:`~recipes.geometry.dmtet.DMTetGeometry`), rasterizes it (:func:`~recipes.render.mesh_raster.render_mesh`,
torch or nvdiffrast) and colours the visible surface points with a hash-grid texture field through the material,
over the background. The render carries the ``mesh`` for the ``normal_consistency`` and ``laplacian_smoothness``
regularizers. Nothing changes between optimizer steps, so the Picard state is the parameters alone.

A fresh scene is a sphere of radius ``init_radius``; :meth:`DMTetScene.init_from` starts it from a coarse NeRF or
SDF stage instead (``--model.init_from RUN``): the grid's SDF from the coarse field at the grid vertices (a density
at its mesh threshold, threestudio's ``geometry_convert_from``) and the texture field from the coarse field's
encoding and feature network (``inherit_texture``); from an earlier DMTet stage it copies the shape (and texture).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.export.mesh import auto_density_threshold, export_mesh
from recipes.geometry.dmtet import DMTetGeometry
from recipes.geometry.texture import TextureField, TextureFieldConfig
from recipes.render.materials import albedo_activation
from recipes.render.mesh_raster import MeshBackend, render_mesh, resolve_backend
from recipes.system.nerf_scene import NeRFOptimizer, NeRFScene, material_and_background
from recipes.system.scene import Scene
from recipes.system.sdf_scene import SDFScene


@dataclass
class DMTetGrid:
    """The tetrahedral grid. Defaults are Magic3D's refine stage at this code's grid.

    Attributes:
        resolution: cubes per axis (6·r³ tets; 64 has about as many vertices as threestudio's ``128_tets``).
            Default is 64.
        radius: the grid spans ``[-radius, radius]^3`` (threestudio's ``isosurface_bbox``). Default is 1.
        deformable: learn per-vertex offsets (up to half a cell). Default is True.
        init_radius: a fresh grid's SDF is the sphere ``‖x‖ − init_radius`` (replaced by ``init_from``).
            Default is 0.5.
    """

    resolution: int = 64
    radius: float = 1.0
    deformable: bool = True
    init_radius: float = 0.5


@dataclass
class DMTetOptimizer(NeRFOptimizer):
    """Adam(W) over the grid (``lr``: its SDF and vertex offsets), the texture field and the background
    (``background_lr``). Magic3D's refine stage: Adam 0.01 on all; ProlificDreamer's geometry stage: 0.005.

    Attributes:
        texture_lr: the texture field's hash grid. Default is 0.01.
        feature_network_lr: the texture field's MLP (ProlificDreamer's texture stage: 0.001). Default is 0.01.
    """

    texture_lr: float = 0.01
    feature_network_lr: float = 0.01


class DMTetScene(Scene):
    """DMTet surface + texture field + material + background, rasterized.

    Args:
        grid: the tet grid. Default is :class:`DMTetGrid`'s.
        texture: the texture field; to inherit the coarse stage's colour it must have that field's radius,
            encoding and MLP. Default is threestudio's implicit-volume encoding.
        backend: the rasterizer, ``"torch"``, ``"nvdiffrast"`` (CUDA) or ``"auto"``. Default is ``"auto"``.
        optimizer: learning rates. Default is Magic3D's refine stage.
        inherit_texture: with ``init_from``, copy the coarse field's colour into the texture field. Default is True.
        init_threshold: the coarse density that becomes the grid's surface, or ``"auto"`` (the mean of the
            non-empty densities at the grid vertices, threestudio's rule); an SDF stage uses its zero level.
            Default is ``"auto"``.
        stage: what is trained: ``"refine"`` (shape and texture, Magic3D), ``"geometry"`` (shape only, rendered as
            its normals ``0.5·(n + 1)`` over the background; ProlificDreamer's geometry stage) or ``"texture"``
            (texture only, the shape frozen; ProlificDreamer's texture stage). Default is ``"refine"``.
        **appearance: ``material``, ``diffuse``, ``unlit``, ``background``, ``solid``, ``environment`` as for
            :class:`~recipes.system.NeRFScene`.
    """

    def __init__(
        self,
        grid: DMTetGrid | None = None,
        texture: TextureFieldConfig | None = None,
        backend: MeshBackend = "auto",
        optimizer: DMTetOptimizer | None = None,
        inherit_texture: bool = True,
        init_threshold: float | Literal["auto"] = "auto",
        stage: Literal["refine", "geometry", "texture"] = "refine",
        **appearance: Any,
    ) -> None:
        super().__init__()
        self.grid_config = grid = grid if grid is not None else DMTetGrid()
        self.geometry = DMTetGeometry(grid.resolution, grid.radius, grid.deformable)
        with torch.no_grad():
            self.geometry.sdf.copy_(
                (self.geometry.grid_vertices.norm(dim=-1) - grid.init_radius).clamp(-1.0, 1.0)
            )
        self.texture = TextureField(texture)
        self.material, self.background = material_and_background(**appearance)
        self.backend = backend
        self.optimizer_config = optimizer if optimizer is not None else DMTetOptimizer()
        self.inherit_texture = inherit_texture
        self.init_threshold = init_threshold
        if stage not in ("refine", "geometry", "texture"):
            raise ValueError(f"unknown DMTet stage {stage!r}; use 'refine', 'geometry' or 'texture'")
        self.stage = stage
        if stage == "texture":
            self.geometry.fix_geometry()

    def check_device(self, device: torch.device) -> None:
        resolve_backend(self.backend, device)
        texture_backend = self.texture.config.encoding.backend
        if texture_backend not in ("torch", "auto") and device.type != "cuda":
            raise ValueError(
                f"the texture field's hash grid backend {texture_backend!r} runs on CUDA only, but this run is on "
                f"{device.type}; set scene.init_args.texture.encoding.backend to 'torch'"
            )

    def prepare_step(self, step: int) -> None:
        for part in (self.texture.encoding, self.material, self.background):
            if hasattr(part, "update_step"):
                part.update_step(step)

    def picard_buffers(self, prefix: str) -> dict[str, bool]:
        names = [f"{prefix}{name}" for name, _ in self.named_buffers() if name.endswith("band_mask")]
        return dict.fromkeys(names, False)  # set by prepare_step from the step alone

    def render(self, cameras: Cameras, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        mesh = self.geometry.isosurface()
        if mesh.faces.shape[0] == 0:
            raise ValueError(
                "the DMTet surface is empty (the grid's SDF has one sign everywhere); start from a coarse stage "
                "(--model.init_from RUN) or set scene.init_args.grid.init_radius inside the grid"
            )
        if self.training:
            shading, ambient_ratio = self.material.sample_shading(generator)
        else:
            shading, ambient_ratio = self.material.default_shading(), None
        batch, height, width = len(cameras), cameras.height, cameras.width
        light = cameras.light_positions[:, None, None, :].expand(batch, height, width, 3)

        def shade(position: Tensor, normal: Tensor) -> Tensor:
            if self.stage == "geometry":
                return 0.5 * (normal + 1.0)
            features = self.texture(position.reshape(-1, 3)).reshape(batch, height, width, -1)
            return self.material(features, position, normal, light, shading, ambient_ratio)

        _, directions = cameras.rays()
        backdrop = self.background(directions, generator=generator)
        out = render_mesh(mesh, cameras, shade=shade, background=backdrop, backend=self.backend)
        return {
            "comp_rgb": out.rgb,
            "comp_rgb_bg": backdrop,
            "opacity": out.alpha,
            "comp_normal": out.normal,
            "mesh": mesh,
        }

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        cfg = self.optimizer_config
        groups = {
            "grid": (self.geometry.parameters(), cfg.lr),
            "texture": (self.texture.encoding.parameters(), cfg.texture_lr),
            "feature_network": (self.texture.feature_network.parameters(), cfg.feature_network_lr),
            "background": (self.background.parameters(), cfg.background_lr),
        }
        if self.stage == "geometry":  # the texture is not rendered
            del groups["texture"], groups["feature_network"]
        return cfg.build(groups), None

    @torch.no_grad()
    def init_from(self, previous: Scene) -> None:
        """The grid's SDF (and the texture) from a trained NeRF, SDF or DMTet scene; any other scene is refused."""
        if isinstance(previous, DMTetScene):
            self._init_from_grid(previous)
            return
        if not isinstance(previous, NeRFScene):
            raise ValueError(
                f"a DMTetScene starts from a NeRFScene, SDFScene or DMTetScene stage, not from a "
                f"{type(previous).__name__}; pass the run folder of such a stage (e.g. a magic3d-coarse run)"
            )
        field, level = previous.surface()
        device = self.geometry.sdf.device
        previous.to(device).eval()
        previous.prepare_step(10**9)  # every hash-grid level of the trained field
        if isinstance(previous, SDFScene):
            self.geometry.initialize_from_field(field, kind="sdf")
        else:
            if self.init_threshold != "auto":
                level = self.init_threshold
            elif level == "auto":
                chunks = self.geometry.grid_vertices.split(65536)
                level = auto_density_threshold(torch.cat([field(p).reshape(-1) for p in chunks]))
            self.geometry.initialize_from_field(field, kind="density", threshold=float(level))
        if self.geometry.isosurface().faces.shape[0] == 0:
            raise ValueError(
                "the coarse stage's surface falls between the tet grid's vertices (no sign change); raise "
                "scene.init_args.grid.resolution or set scene.init_args.init_threshold"
            )
        if self.inherit_texture:
            self.texture.inherit(previous.geometry)

    def _init_from_grid(self, previous: DMTetScene) -> None:
        """Copy an earlier DMTet stage's shape (same grid) and, with ``inherit_texture``, its texture field."""
        ours, theirs = self.grid_config, previous.grid_config
        if (ours.resolution, ours.radius) != (theirs.resolution, theirs.radius):
            raise ValueError(
                f"the earlier DMTet stage has a grid of resolution {theirs.resolution} and radius {theirs.radius}, "
                f"this one {ours.resolution} and {ours.radius}; set scene.init_args.grid to the earlier stage's"
            )
        self.geometry.sdf.copy_(previous.geometry.sdf)
        self.geometry.deformation.copy_(previous.geometry.deformation)
        if self.inherit_texture:
            self.texture.inherit(previous.texture)

    @torch.no_grad()
    def export_mesh(self, stem: Path, resolution: int = 128, texture_size: int | None = 512) -> list[Path]:
        mesh = self.geometry.isosurface()
        mesh.vertices = mesh.vertices.detach()
        activation = getattr(self.material.config, "albedo_activation", "sigmoid")

        def color(points: Tensor) -> Tensor:
            return albedo_activation(activation, self.texture(points.to(mesh.vertices.device))[..., :3])

        stem = Path(stem)
        return [
            export_mesh(stem.with_suffix(".obj"), mesh, color, texture_size=texture_size),
            export_mesh(stem.with_suffix(".glb"), mesh, color),
        ]


__all__ = ["DMTetGrid", "DMTetOptimizer", "DMTetScene"]
