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
    auto_density_threshold,
    bake_texture,
    export_mesh,
    export_nerf_mesh,
    image_grid,
    marching_cubes,
    nerf_mesh,
    save_image,
    save_mesh,
    save_turntable,
    write_video,
)
from recipes.export.mesh import sample_grid
from recipes.geometry.gaussians import Gaussians
from recipes.geometry.hashgrid import HashGridConfig
from recipes.geometry.mesh import TriangleMesh
from recipes.geometry.nerf import ImplicitVolume, ImplicitVolumeConfig
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


def test_auto_threshold_meshes_an_analytic_density_ball_at_the_right_radius():
    sigma, sharpness, ball = 50.0, 60.0, 0.5

    class Ball:
        radius = 1.0

        def density(self, p):
            return sigma * torch.sigmoid(sharpness * (ball - p.norm(dim=-1)))

    grid = sample_grid(Ball().density, 48, 1.0)
    threshold = auto_density_threshold(grid)
    assert threshold == pytest.approx(grid[grid > 1e-5].mean().item())  # threestudio's "auto"
    assert 0 < threshold < sigma
    mesh = nerf_mesh(Ball(), resolution=48)
    radius = mesh.vertices.norm(dim=-1)
    expected = ball - math.log(threshold / (sigma - threshold)) / sharpness  # density(r) = threshold
    assert abs(radius.mean().item() - expected) < 0.005 and radius.std() < 0.01
    assert abs(radius.mean().item() - ball) < 0.03 and mesh.volume() > 0
    with pytest.raises(ValueError, match="the density field is empty"):
        marching_cubes(lambda p: torch.zeros(p.shape[0]), 8, 1.0, level="auto")
    with pytest.raises(ValueError, match="no surface at level 60"):
        marching_cubes(Ball().density, 8, 1.0, level=60.0)


def test_a_nerf_geometry_is_meshed_and_exported_in_one_call(tmp_path):
    config = ImplicitVolumeConfig(
        encoding=HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    )
    field = ImplicitVolume(config)
    with torch.no_grad():
        field.density_network.layers[-1].weight.zero_()  # density = softplus(10·(1 − r/0.5)): a blob
        field.feature_network.layers[-1].weight.zero_()  # albedo sigmoid(0) = 0.5 everywhere
    mesh = field.isosurface(resolution=40)
    grid = sample_grid(field.density, 40, field.radius)
    threshold = grid[grid > 1e-5].mean().item()
    expected = 0.5 * (1 - math.log(math.expm1(threshold)) / 10.0)
    assert abs(mesh.vertices.norm(dim=-1).mean().item() - expected) < 0.01
    from recipes.render.materials import NoMaterial

    path = export_nerf_mesh(tmp_path / "nerf.ply", field, NoMaterial(), resolution=24)
    reopened = trimesh.load(path, process=False)
    assert len(reopened.faces) > 100
    assert np.abs(reopened.visual.vertex_colors[:, :3].astype(float) - 128).max() <= 1


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
    world = mesh.vertices.numpy()
    expected_vertices = world[:, [1, 2, 0]] if suffix == ".glb" else world  # glTF is +Y up
    np.testing.assert_allclose(back.vertices, expected_vertices, atol=1e-5)
    colors = np.asarray(back.visual.vertex_colors)[:, :3]
    expected = (height_colour(mesh.vertices).numpy() * 255).round()
    np.testing.assert_array_equal(colors, expected)


def test_glb_is_y_up_facing_the_viewer_and_obj_ply_stay_z_up(tmp_path):
    # a tall box along world z with a bump on its front (+x, the azimuth-0 view)
    box = trimesh.creation.box(extents=(0.2, 0.4, 1.0))
    nose = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    nose.apply_translation((0.15, 0.0, 0.0))
    both = trimesh.util.concatenate([box, nose])
    mesh = TriangleMesh(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces))
    glb = trimesh.load(save_mesh(tmp_path / "box.glb", mesh), force="mesh", process=False)
    lo, hi = glb.bounds
    assert np.argmax(hi - lo) == 1  # tallest along glTF +Y: the object stands up
    assert hi[2] == pytest.approx(0.2) and lo[2] == pytest.approx(-0.1)  # the front faces +Z
    assert hi[0] - lo[0] == pytest.approx(0.4)  # world y runs along glTF X
    assert glb.volume > 0  # a rotation: faces keep their outward winding
    for suffix in (".obj", ".ply"):
        back = trimesh.load(save_mesh(tmp_path / f"box{suffix}", mesh), force="mesh", process=False)
        lo, hi = back.bounds
        assert np.argmax(hi - lo) == 2 and hi[0] == pytest.approx(0.2)  # world coordinates, z-up


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
