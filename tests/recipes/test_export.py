"""Export: marching cubes of fields, mesh files that reopen, baked textures, turntable videos and grids."""

from __future__ import annotations

import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from recipes.export import (
    GaussianDensityField,
    bake_texture,
    export_mesh,
    image_grid,
    marching_cubes,
    save_image,
    save_mesh,
    save_turntable,
    write_video,
)
from recipes.geometry.gaussians import Gaussians
from recipes.geometry.mesh import TriangleMesh
from recipes.geometry.tets import cube_tet_grid, marching_tetrahedra
from recipes.render.mesh_raster import render_mesh


def sphere_sdf(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 0.5


def height_colour(p: torch.Tensor) -> torch.Tensor:
    """Red below z = 0, blue above: easy to check after a round trip."""
    up = (p[:, 2:3] > 0).float()
    return torch.cat([1 - up, torch.zeros_like(up), up], dim=-1)


def test_marching_cubes_of_a_sphere_sdf_has_the_right_area_and_orientation():
    mesh = marching_cubes(sphere_sdf, resolution=48, radius=0.7)
    assert abs(mesh.area().item() / (4 * math.pi * 0.25) - 1) < 0.02
    assert mesh.volume() > 0
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy())
    assert tm.is_watertight
    density = marching_cubes(lambda p: 3.0 * torch.exp(-p.square().sum(-1) / 0.18), 40, 0.8, level=1.0)
    expected_radius = math.sqrt(0.18 * math.log(3.0))
    assert abs(density.vertices.norm(dim=-1).mean().item() - expected_radius) < 0.01
    assert density.volume() > 0


def test_gaussian_density_field_is_meshable():
    g = Gaussians(num_points=200, radius=0.3, init_opacity=0.9)
    with torch.no_grad():
        g.log_scales.fill_(math.log(0.06))
    mesh = marching_cubes(GaussianDensityField(g), resolution=24, radius=0.6, level=1.0)
    assert mesh.faces.shape[0] > 100 and mesh.volume() > 0
    assert mesh.vertices.norm(dim=-1).max() < 0.3 + 3 * 0.06


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb"])
def test_vertex_coloured_meshes_reopen(tmp_path, suffix):
    vertices, tets = cube_tet_grid(8, radius=0.6)
    mesh = marching_tetrahedra(vertices, tets, sphere_sdf(vertices))
    path = export_mesh(tmp_path / f"sphere{suffix}", mesh, color=height_colour)
    back = trimesh.load(path, force="mesh", process=False)
    assert len(back.faces) == mesh.faces.shape[0]
    np.testing.assert_allclose(back.vertices, mesh.vertices.numpy(), atol=1e-5)
    colors = np.asarray(back.visual.vertex_colors)[:, :3]
    expected = (height_colour(mesh.vertices).numpy() * 255).round()
    np.testing.assert_array_equal(colors, expected)


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_baked_texture_reproduces_the_colour_field(tmp_path, suffix):
    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = TriangleMesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces))
    smooth = lambda p: (p + 0.5).clamp(0, 1)  # noqa: E731
    textured = bake_texture(mesh, smooth, texture_size=128)
    assert textured.uv.min() >= 0 and textured.uv.max() <= 1
    # the texel under each vertex's uv holds that vertex's colour
    rows = ((1 - textured.uv[:, 1]) * 127).round().long()
    cols = (textured.uv[:, 0] * 127).round().long()
    sampled = textured.texture[rows, cols]
    assert (sampled - smooth(textured.vertices)).abs().mean() < 0.05
    path = save_mesh(tmp_path / f"textured{suffix}", textured)
    back = trimesh.load(path, force="mesh", process=False)
    assert len(back.faces) == mesh.faces.shape[0]
    assert back.visual.uv is not None and back.visual.uv.shape == (len(back.vertices), 2)


def test_turntable_video_and_grid_are_written_and_read_back(tmp_path):
    ico = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    mesh = TriangleMesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces))
    colours = height_colour(mesh.vertices)

    def render(cameras):
        return render_mesh(mesh, cameras, vertex_colors=colours, background=torch.ones(3)).rgb

    paths = save_turntable(
        tmp_path / "turntable", render, fps=10, n_views=12, height=24, width=24, distance=2.0, fovy_deg=40.0
    )
    assert [p.suffix for p in paths] == [".mp4", ".gif"]
    reader = imageio.get_reader(paths[0])
    frames = [frame for frame in reader]
    assert len(frames) == 12 and frames[0].shape == (24, 24, 3)
    assert (
        frames[0][12, 12].astype(float) @ np.array([1.0, 0, -1]) != 0
    )  # the object, not the white background
    assert (frames[0][0, 0] > 240).all()
    gif = imageio.mimread(paths[1])
    assert len(gif) == 12
    grid = image_grid(torch.rand(5, 8, 10, 3), columns=3, padding=1)
    assert grid.shape == (2 * 8 + 3, 3 * 10 + 4, 3) and grid.dtype == np.uint8
    png = save_image(tmp_path / "grid.png", grid)
    np.testing.assert_array_equal(imageio.imread(png), grid)
    with pytest.raises(ValueError, match="unsupported"):
        write_video(tmp_path / "x.avi", np.zeros((2, 8, 8, 3), np.uint8))
