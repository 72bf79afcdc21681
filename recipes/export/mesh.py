"""Meshes out of any representation, and files out of meshes.

- :func:`marching_cubes` extracts the surface of any field callable ``field(points [P,3]) -> [P]`` (an
  SDF, a NeRF density, :class:`GaussianDensityField`) with scikit-image; a DMTet geometry gives its
  mesh directly (``geometry.isosurface()``, marching tets). A density's level may be ``"auto"``
  (:func:`auto_density_threshold`); :func:`nerf_mesh` and :func:`export_nerf_mesh` mesh a NeRF field in
  one call.
- :func:`bake_texture` unwraps a mesh with xatlas and bakes a colour field into a texture image by
  rasterizing the UV layout with :mod:`recipes.render.mesh_raster`.
- :func:`save_mesh` writes ``.obj`` / ``.ply`` / ``.glb`` with vertex colours or a texture (trimesh).
  ``.obj`` and ``.ply`` keep the world coordinates (z-up, as threestudio writes them); ``.glb`` is
  converted to glTF's +Y-up frame with the front (+x, azimuth 0) towards +Z, the viewer
  (:data:`GLTF_FROM_WORLD`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from recipes.geometry.gaussians import covariances
from recipes.geometry.mesh import TriangleMesh
from recipes.render.mesh_raster import MeshBackend, interpolate, rasterize

Field = Callable[[Tensor], Tensor]
Level = float | Literal["auto"]

AUTO_THRESHOLD_EPS = 1.0e-5

GLTF_FROM_WORLD = (1, 2, 0)
"""glTF axes as world axes: glTF (X, Y, Z) = world (y, z, x). A proper rotation (determinant +1, so
faces keep their winding): world up (+z) becomes glTF up (+Y), and the azimuth-0 view (camera on +x)
becomes a glTF viewer's default view from +Z, with world +y to its right as in that camera's image."""


def auto_density_threshold(values: Tensor, eps: float = AUTO_THRESHOLD_EPS) -> float:
    """threestudio's ``isosurface_threshold: auto``: the mean of the grid densities above ``eps``.

    Scale-free (a learned density may peak at 5 or at 500) and it needs no knowledge of the render
    step; the empty space (density ≈ 0) is left out so that the box size does not dilute it.
    """
    solid = values[values > eps]
    if solid.numel() == 0:
        raise ValueError(
            f"the density field is empty (no grid value above {eps:g}, maximum {values.max().item():.3g}): "
            "there is no surface to extract; train longer or pass a numeric threshold"
        )
    return solid.mean().item()


@torch.no_grad()
def sample_grid(
    field: Field, resolution: int, radius: float, chunk: int = 65536, device: str | torch.device = "cpu"
) -> Tensor:
    """``field`` at the ``resolution³`` points of a regular grid over ``[−radius, radius]³``, ``[R, R, R]``."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = torch.cat([field(p).reshape(-1).float() for p in points.split(chunk)])
    return values.reshape(resolution, resolution, resolution)


def marching_cubes(
    field: Field,
    resolution: int = 128,
    radius: float = 1.0,
    level: Level = 0.0,
    chunk: int = 65536,
) -> TriangleMesh:
    """Surface ``field = level`` on a ``resolution³`` grid over ``[−radius, radius]³`` (closed ones outward-oriented).

    Works for an SDF (``level`` 0, the default) and for a density (``level`` = the iso-density, or
    ``"auto"`` for :func:`auto_density_threshold` of the sampled grid; DreamGaussian extracts its
    Gaussians' density at level 1, threestudio a NeRF at its ``isosurface_threshold``).
    """
    from skimage.measure import marching_cubes as skimage_marching_cubes

    grid = sample_grid(field, resolution, radius, chunk)
    if level == "auto":
        level = auto_density_threshold(grid)
    values = grid.cpu().numpy()
    low, high = float(values.min()), float(values.max())
    if not low < level < high:
        raise ValueError(
            f"the field has no surface at level {level:g}: its values on the grid lie in [{low:.3g}, "
            f"{high:.3g}]; choose a level inside that range (or 'auto' for a density)"
        )
    spacing = (2 * radius / (resolution - 1),) * 3
    vertices, faces, _, _ = skimage_marching_cubes(values, level=float(level), spacing=spacing)
    mesh = TriangleMesh(
        torch.from_numpy(vertices.copy()).float() - radius, torch.from_numpy(faces.astype(np.int64))
    )
    if mesh.volume() < 0:  # orient closed surfaces outwards whatever the field's sign convention
        mesh = TriangleMesh(mesh.vertices, mesh.faces.flip(-1))
    return mesh


def nerf_mesh(geometry, resolution: int = 128, threshold: Level = "auto", chunk: int = 65536) -> TriangleMesh:
    """The isosurface ``density = threshold`` of a NeRF field (:class:`~recipes.geometry.nerf.ImplicitVolume`
    or anything with ``density(points)`` and ``radius``) over its box. Default threshold is ``"auto"``."""
    with torch.no_grad():
        return marching_cubes(geometry.density, resolution, geometry.radius, threshold, chunk)


def export_nerf_mesh(
    path: str | Path,
    geometry,
    material=None,
    resolution: int = 128,
    threshold: Level = "auto",
    texture_size: int | None = None,
    backend: MeshBackend = "torch",
) -> Path:
    """Mesh a NeRF field and write it to ``path`` (.obj/.ply/.glb) in one call.

    Coloured by the material's albedo of the field's features at the surface (baked into a
    ``texture_size²`` texture when set, else per vertex); uncoloured without a material.
    """
    mesh = nerf_mesh(geometry, resolution, threshold)
    color = None
    if material is not None:

        def color(points: Tensor) -> Tensor:
            with torch.no_grad():
                features = geometry(points).features
                return material(features, points, None, None, "albedo")

    return export_mesh(path, mesh, color, texture_size, backend)


class GaussianDensityField:
    """The opacity-weighted density ``Σ_i o_i exp(−½ dᵀ Σ_i⁻¹ d)`` of 3D Gaussians at query points.

    DreamGaussian meshes its Gaussians by marching cubes of this field at level 1. Evaluated densely
    (points × Gaussians per chunk), so keep the resolution modest on a CPU.
    """

    def __init__(self, gaussians, chunk: int = 4096) -> None:
        with torch.no_grad():
            self.means = gaussians.means.detach()
            self.opacities = gaussians.opacities.detach()
            self.precisions = torch.linalg.inv(
                covariances(gaussians.rotations.detach(), gaussians.scales.detach())
            )
        self.chunk = chunk

    def mahalanobis(self, points: Tensor) -> Tensor:
        """Squared Mahalanobis distance ``[P, N]`` of ``points [P, 3]`` to every Gaussian."""
        d = points[:, None] - self.means[None]  # [P, N, 3]
        return torch.einsum("pni,nij,pnj->pn", d, self.precisions, d)

    @torch.no_grad()
    def __call__(self, points: Tensor) -> Tensor:
        return torch.cat(
            [
                (self.opacities * torch.exp(-0.5 * self.mahalanobis(p))).sum(-1)
                for p in points.split(self.chunk)
            ]
        )


class GaussianColorField(GaussianDensityField):
    """Colour at points: the mean colour of the Gaussians weighted by their density there (for baking textures).

    The weights are normalised in log space, so points far from every Gaussian still get their nearest
    Gaussians' colour rather than black.
    """

    def __init__(self, gaussians, chunk: int = 2048) -> None:
        super().__init__(gaussians, chunk)
        self.colors = gaussians.colors.detach().clamp(0, 1)

    @torch.no_grad()
    def __call__(self, points: Tensor) -> Tensor:
        log_opacities = torch.log(self.opacities.clamp_min(1e-12))
        return torch.cat(
            [
                torch.softmax(log_opacities - 0.5 * self.mahalanobis(p), dim=-1) @ self.colors
                for p in points.split(self.chunk)
            ]
        )


@dataclass
class TexturedMesh:
    """A mesh with per-corner UVs: ``vertices [V', 3]`` (split along seams), ``faces``, ``uv [V', 2]``
    in [0, 1] (v up, OBJ convention) and an RGB ``texture [H, W, 3]`` in [0, 1]."""

    vertices: Tensor
    faces: Tensor
    uv: Tensor
    texture: Tensor


def dilate_texture(texture: Tensor, covered: Tensor, iterations: int = 8) -> Tensor:
    """Fill ``iterations`` pixels around covered texels with the mean of covered 4-neighbours (hides seams)."""
    texture, covered = texture.clone(), covered.clone()
    for _ in range(iterations):
        padded = torch.nn.functional.pad(texture.permute(2, 0, 1)[None], (1, 1, 1, 1))[0].permute(1, 2, 0)
        weight = torch.nn.functional.pad(covered.float()[None, None], (1, 1, 1, 1))[0, 0]
        h, w = covered.shape
        total = torch.zeros_like(texture)
        count = torch.zeros(h, w)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            total += padded[dy : dy + h, dx : dx + w] * weight[dy : dy + h, dx : dx + w, None]
            count += weight[dy : dy + h, dx : dx + w]
        grow = ~covered & (count > 0)
        texture[grow] = total[grow] / count[grow, None]
        covered |= grow
    return texture


@torch.no_grad()
def bake_texture(
    mesh: TriangleMesh, color: Field, texture_size: int = 1024, backend: MeshBackend = "torch"
) -> TexturedMesh:
    """Unwrap ``mesh`` with xatlas and fill a ``texture_size²`` image with ``color(points) -> [P, 3]``
    evaluated at the surface point of every texel (threestudio's exporter does this with nvdiffrast)."""
    import xatlas

    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    vmapping, indices, uvs = xatlas.parametrize(vertices, mesh.faces.cpu().numpy().astype(np.uint32))
    device = mesh.vertices.device
    new_vertices = mesh.vertices.detach()[torch.from_numpy(vmapping.astype(np.int64)).to(device)]
    faces = torch.from_numpy(indices.astype(np.int64)).to(device)
    uv = torch.from_numpy(uvs).float().to(device)
    clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=-1)
    rast = rasterize(clip, faces, texture_size, texture_size, backend)
    points = interpolate(new_vertices, rast)[0]
    covered = rast.mask[0]
    texture = torch.zeros(texture_size, texture_size, 3, device=device)
    if covered.any():
        texture[covered] = color(points[covered]).float().clamp(0, 1)
    texture = dilate_texture(texture.cpu(), covered.cpu())
    return TexturedMesh(new_vertices, faces, uv, texture)


def _to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    return (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8) if array.dtype != np.uint8 else array


def save_mesh(
    path: str | Path,
    mesh: TriangleMesh | TexturedMesh,
    vertex_colors: Tensor | None = None,
) -> Path:
    """Write ``mesh`` to ``.obj`` (+ ``.mtl`` and texture png when textured), ``.ply`` or ``.glb``.

    ``vertex_colors [V, 3]`` in [0, 1] are stored per vertex (ignored for a :class:`TexturedMesh`).
    ``.obj``/``.ply`` vertices are the world coordinates (z-up); ``.glb`` vertices are rotated into
    glTF's +Y-up frame (:data:`GLTF_FROM_WORLD`).
    """
    import trimesh
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in (".obj", ".ply", ".glb"):
        raise ValueError(f"unsupported mesh format {path.suffix!r}; use .obj, .ply or .glb")
    path.parent.mkdir(parents=True, exist_ok=True)
    vertices = mesh.vertices.detach().cpu().numpy()
    if path.suffix.lower() == ".glb":
        vertices = vertices[:, list(GLTF_FROM_WORLD)]
    faces = mesh.faces.cpu().numpy()
    if isinstance(mesh, TexturedMesh):
        visual = trimesh.visual.TextureVisuals(
            uv=mesh.uv.cpu().numpy(), image=Image.fromarray(_to_uint8(mesh.texture))
        )
        out = trimesh.Trimesh(vertices, faces, visual=visual, process=False)
    else:
        colors = None if vertex_colors is None else _to_uint8(vertex_colors)
        out = trimesh.Trimesh(vertices, faces, vertex_colors=colors, process=False)
    out.export(path)
    return path


def export_mesh(
    path: str | Path,
    mesh: TriangleMesh,
    color: Field | None = None,
    texture_size: int | None = None,
    backend: MeshBackend = "torch",
) -> Path:
    """Write ``mesh`` coloured by ``color(points)``: baked into a texture when ``texture_size`` is set,
    else sampled at the vertices (threestudio's ``fmt obj`` vs ``obj-mtl``)."""
    if color is not None and texture_size:
        return save_mesh(path, bake_texture(mesh, color, texture_size, backend))
    vertex_colors = None
    if color is not None:
        with torch.no_grad():
            vertex_colors = color(mesh.vertices.detach())
    return save_mesh(path, mesh, vertex_colors)
