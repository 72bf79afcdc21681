"""DMTet: generated tet grid, marching tets, conversion from a field, mesh losses, and the mesh rasterizer."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from recipes.data.cameras import cameras_from_spherical
from recipes.geometry.dmtet import DMTetGeometry
from recipes.geometry.mesh import TriangleMesh, edge_faces, laplacian_loss, normal_consistency_loss
from recipes.geometry.tets import TRIANGLE_TABLE, cube_tet_grid, marching_tetrahedra
from recipes.render.mesh_raster import rasterize, render_mesh, resolve_backend


def one_camera(size: int = 32, distance: float = 2.0, fovy_deg: float = 40.0):
    def full(value: float) -> torch.Tensor:
        return torch.tensor([value])

    return cameras_from_spherical(full(20.0), full(30.0), full(distance), full(fovy_deg), size, size)


def icosphere(radius: float = 0.5, subdivisions: int = 3) -> TriangleMesh:
    ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return TriangleMesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces))


def as_trimesh(mesh: TriangleMesh) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices.detach().numpy(), mesh.faces.numpy(), process=False)


def test_tet_grid_is_conforming_and_positively_oriented():
    vertices, tets = cube_tet_grid(3, radius=0.5)
    assert vertices.shape == (64, 3) and tets.shape == (6 * 27, 4)
    p = vertices[tets]
    volume = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    assert (volume > 0).all()
    torch.testing.assert_close(volume.sum(), torch.tensor(1.0))
    # conforming: every interior triangle is shared by exactly two tets, boundary ones by one
    faces = (
        torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]])
        .sort(1)
        .values
    )
    _, counts = torch.unique(faces, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert (counts == 1).sum() == 6 * 9 * 2  # two triangles per boundary square


def test_triangle_table_covers_every_sign_pattern():
    counts = (TRIANGLE_TABLE[..., 0] >= 0).sum(-1)
    ones = [bin(c).count("1") for c in range(16)]
    assert counts.tolist() == [0 if k in (0, 4) else 2 if k == 2 else 1 for k in ones]


def test_marching_tets_of_a_sphere_is_closed_and_outward():
    vertices, tets = cube_tet_grid(12, radius=0.5)
    mesh = marching_tetrahedra(vertices, tets, vertices.norm(dim=-1) - 0.3)
    tm = as_trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent and tm.euler_number == 2
    assert mesh.volume() > 0
    assert abs(tm.volume / (4 / 3 * math.pi * 0.3**3) - 1) < 0.06
    assert (mesh.vertices.norm(dim=-1) - 0.3).abs().max() < 0.03
    assert len(tm.split(only_watertight=False)) == 1


def test_dmtet_gradients_and_conversion_from_a_field():
    geometry = DMTetGeometry(resolution=8, radius=0.6)
    geometry.initialize_from_field(lambda p: 5.0 * (0.4 - p.norm(dim=-1)), kind="density", threshold=0.5)
    assert geometry.sdf.abs().max() <= 1.0
    mesh = geometry.isosurface()
    assert as_trimesh(mesh).is_watertight
    # the surface sits where density = threshold, i.e. |p| = 0.3
    assert (mesh.vertices.norm(dim=-1) - 0.3).abs().max() < 0.03
    with torch.no_grad():
        geometry.deformation.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    mesh = geometry.isosurface()
    loss = mesh.vertices.square().sum() + 0.1 * normal_consistency_loss(mesh) + 0.1 * laplacian_loss(mesh)
    loss.backward()
    assert geometry.sdf.grad.abs().sum() > 0 and geometry.deformation.grad.abs().sum() > 0
    sdf_geometry = DMTetGeometry(resolution=8, radius=0.6, deformable=False)
    sdf_geometry.initialize_from_field(lambda p: p.norm(dim=-1) - 0.3, kind="sdf")
    torch.testing.assert_close(sdf_geometry.sdf, (sdf_geometry.grid_vertices.norm(dim=-1) - 0.3).clamp(-1, 1))
    assert (sdf_geometry.isosurface().vertices.norm(dim=-1) - 0.3).abs().max() < 0.03
    assert not sdf_geometry.deformation.requires_grad
    sdf_geometry.fix_geometry()
    assert not sdf_geometry.sdf.requires_grad


def test_normal_consistency_and_laplacian_losses():
    sphere = icosphere(subdivisions=3)
    smooth_nc, smooth_lap = normal_consistency_loss(sphere), laplacian_loss(sphere)
    generator = torch.Generator().manual_seed(0)
    noisy = TriangleMesh(
        sphere.vertices + 0.02 * torch.randn(sphere.vertices.shape, generator=generator), sphere.faces
    )
    assert normal_consistency_loss(noisy) > 3 * smooth_nc
    assert laplacian_loss(noisy) > 3 * smooth_lap
    # flat grid interior: zero Laplacian at interior vertices, zero normal consistency
    flat = TriangleMesh(
        torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]), torch.tensor([[0, 1, 2], [1, 3, 2]])
    )
    assert normal_consistency_loss(flat) == 0
    edges, adjacent = edge_faces(flat.faces)
    assert edges.shape == (5, 2) and (adjacent[:, 1] >= 0).sum() == 1


def test_mesh_rasterizer_draws_the_sphere_silhouette_colour_and_normals():
    size, distance, fovy = 32, 2.0, 40.0
    cams = one_camera(size, distance, fovy)
    sphere = icosphere()
    out = render_mesh(
        sphere,
        cams,
        vertex_colors=torch.tensor([1.0, 0.2, 0.1]).expand(sphere.num_vertices, 3),
        background=torch.ones(3),
    )
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    disc_radius = focal * math.tan(math.asin(0.5 / distance))
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r2 = (xs - size / 2) ** 2 + (ys - size / 2) ** 2
    disc = r2 <= disc_radius**2
    silhouette = out.alpha[0, ..., 0] > 0.5
    assert (silhouette & disc).sum() / (silhouette | disc).sum() > 0.95
    assert abs(out.alpha.sum().item() / (math.pi * disc_radius**2) - 1) < 0.03
    inner = r2 < (disc_radius - 1.5) ** 2
    torch.testing.assert_close(out.rgb[0][inner], torch.tensor([1.0, 0.2, 0.1]).expand(int(inner.sum()), 3))
    torch.testing.assert_close(
        out.rgb[0][r2 > (disc_radius + 1.5) ** 2], torch.ones(int((r2 > (disc_radius + 1.5) ** 2).sum()), 3)
    )
    toward_camera = torch.nn.functional.normalize(cams.positions[0], dim=0)
    assert torch.dot(out.normal[0, size // 2, size // 2], toward_camera) > 0.99
    # the visible point under the centre pixel is the front of the sphere
    assert abs(out.position[0, size // 2, size // 2].norm() - 0.5) < 0.01
    assert torch.dot(out.position[0, size // 2, size // 2], toward_camera) > 0.49


def test_mesh_rasterizer_silhouette_gradient_matches_the_area_derivative():
    size, distance, fovy = 32, 2.0, 40.0
    sphere = icosphere()
    scale = torch.tensor(1.0, requires_grad=True)
    out = render_mesh(TriangleMesh(sphere.vertices * scale, sphere.faces), one_camera(size, distance, fovy))
    area = out.alpha.sum()
    area.backward()
    # the covered area grows like scale², so d(area)/d(scale) ≈ 2·area at scale 1
    assert abs(scale.grad.item() / (2 * area.item()) - 1) < 0.1


def test_mesh_rasterizer_interior_gradients_reach_vertices_and_colours():
    sphere = icosphere(subdivisions=2)
    vertices = sphere.vertices.clone().requires_grad_()
    colors = torch.rand(sphere.num_vertices, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = render_mesh(TriangleMesh(vertices, sphere.faces), one_camera(24), vertex_colors=colors)
    (out.rgb * torch.linspace(0, 1, 24)[None, :, None, None]).sum().backward()
    seen = out.rast.face_id.unique()
    seen_vertices = sphere.faces[seen[seen >= 0]].unique()
    assert colors.grad[seen_vertices].abs().sum(-1).gt(0).float().mean() > 0.9
    assert vertices.grad[seen_vertices].abs().sum() > 0
    unseen = torch.ones(sphere.num_vertices, dtype=torch.bool)
    unseen[seen_vertices] = False
    assert colors.grad[unseen].abs().sum() == 0


def test_rasterizer_uses_the_nearest_face_and_handles_empty_views():
    # two overlapping screen-filling triangles at different depths (clip = NDC, w = 1)
    clip = torch.tensor(
        [
            [-3.0, -3, 0.5, 1],
            [3, -3, 0.5, 1],
            [0, 3, 0.5, 1],
            [-3, -3, -0.5, 1],
            [3, -3, -0.5, 1],
            [0, 3, -0.5, 1],
        ]
    )
    rast = rasterize(clip, torch.tensor([[0, 1, 2], [3, 4, 5]]), 8, 8)
    assert (rast.face_id == 1).all()
    torch.testing.assert_close(rast.bary.sum(-1), torch.ones(1, 8, 8))
    empty = rasterize(clip + torch.tensor([10.0, 0, 0, 0]), torch.tensor([[0, 1, 2]]), 8, 8)
    assert (empty.face_id == -1).all()


def test_triangles_crossing_the_near_plane_are_clipped_not_dropped():
    from recipes.data.cameras import Cameras, look_at

    # a floor square of side 8 at z = 0, as two triangles; the camera stands on it at height 0.5 looking
    # along +x and a little down, so one triangle has one corner behind the eye and the other two
    eye, target = torch.tensor([[0.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.2]])
    size, near = 32, 0.6
    cams = Cameras(
        c2w=look_at(eye, target),
        fovy=torch.deg2rad(torch.tensor([90.0])),
        height=size,
        width=size,
        elevation_deg=torch.zeros(1),
        azimuth_deg=torch.zeros(1),
        distance=torch.ones(1),
        light_positions=eye.clone(),
    )
    corners = torch.tensor([[-4.0, -4, 0], [4, -4, 0], [4, 4, 0], [-4, 4, 0]], requires_grad=True)
    floor = TriangleMesh(corners, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    out = render_mesh(floor, cams, near=near)
    # analytic: each pixel's ray meets z = 0 at eye + s·d; covered iff inside the square and in front of near
    origins, directions = cams.rays()
    s = -origins[..., 2] / directions[..., 2].clamp(max=-1e-9)
    hit = origins + s[..., None] * directions
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    depth = ((hit - eye) * forward).sum(-1)
    inside = hit[..., :2].abs().amax(-1)
    down = directions[..., 2] < 0
    surely_in = down & (inside < 3.95) & (depth > near * 1.02)
    surely_out = ~down | (inside > 4.05) | (depth < near * 0.98)
    assert surely_in.sum() > 200 and (down & (depth < near * 0.98)).sum() > 20  # both regions exist
    mask = out.rast.mask
    assert mask[surely_in].all() and not mask[surely_out].any()
    # perspective-correct barycentrics of the original faces: the interpolated position is the hit point
    assert (out.position[surely_in] - hit[surely_in]).abs().max() < 1e-3
    torch.testing.assert_close(out.rast.bary[mask].sum(-1), torch.ones(int(mask.sum())))
    assert set(out.rast.face_id[mask].unique().tolist()) == {0, 1}
    assert torch.isfinite(out.rgb).all()
    out.position[mask].sum().backward()
    assert torch.isfinite(corners.grad).all() and corners.grad.abs().sum() > 0


def test_mesh_backend_setting():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("opengl", torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_nvdiffrast_matches_torch_reference():
    pytest.importorskip("nvdiffrast")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sphere = icosphere()
    mesh = TriangleMesh(sphere.vertices.cuda(), sphere.faces.cuda())
    cams = one_camera(64).to("cuda")
    fast = render_mesh(mesh, cams, backend="nvdiffrast")
    ref = render_mesh(mesh, cams, backend="torch")
    assert (fast.rast.face_id != ref.rast.face_id).float().mean() < 0.01
    assert (fast.rgb - ref.rgb).abs().mean() < 1e-2


def test_background_pixels_give_finite_gradients_where_the_stand_in_face_divides_by_zero():
    """A background pixel looks its barycentrics up in face 0; where their 1/w-weighted sum is exactly 0 (here
    (−2, 1.5, 1.5) with w = (2, 3, 3) at pixel (3, 3)), the masked 0/0 must not send NaN into the gradient."""
    screen = torch.tensor([[0.5, 0.5], [2.5, 0.5], [0.5, 2.5]])
    w = torch.tensor([2.0, 3.0, 3.0])
    ndc_x, ndc_y = screen[:, 0] / 4 - 1, 1 - screen[:, 1] / 4  # an 8x8 image
    clip = torch.stack([ndc_x * w, ndc_y * w, torch.zeros(3), w], dim=-1).requires_grad_(True)
    rast = rasterize(clip, torch.tensor([[0, 1, 2]]), 8, 8)
    assert rast.face_id[0, 3, 3] == -1
    rast.bary.sum().backward()
    assert torch.isfinite(clip.grad).all()
