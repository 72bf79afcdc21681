"""Camera conventions (z-up world, OpenGL c2w), turntables and the step-indexed random camera batches."""

import math

import pytest
import torch

from recipes.data.cameras import Cameras, look_at, orbit_cameras


def _project_pixels(cameras: Cameras, points: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (x = column, y = row, top-left origin) of world points [B, N, 3] through mvp."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    clip = torch.einsum("bij,bnj->bni", cameras.mvp(), homogeneous)
    ndc = clip[..., :3] / clip[..., 3:]
    column = (ndc[..., 0] + 1) * 0.5 * cameras.width
    row = (1 - ndc[..., 1]) * 0.5 * cameras.height
    return torch.stack([column, row], dim=-1)


def test_look_at_is_opengl_and_z_up():
    eye = torch.tensor([[2.0, 0.0, 0.0]])
    c2w = look_at(eye, torch.zeros(1, 3))
    assert torch.allclose(c2w[0, :3, 2], torch.tensor([1.0, 0.0, 0.0]))  # camera looks along its -z
    assert torch.allclose(c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0]))  # camera y is world up
    assert torch.allclose(c2w[0, :3, 0], torch.tensor([0.0, 1.0, 0.0]))  # right-handed: x = y × z
    assert torch.allclose(c2w[0, :3, 3], eye[0])
    rotation = c2w[0, :3, :3]
    assert torch.allclose(rotation.T @ rotation, torch.eye(3), atol=1e-6)
    assert torch.det(rotation) == pytest.approx(1.0, abs=1e-6)


def test_orbit_cameras_look_at_origin_from_given_distance():
    cams = orbit_cameras(8, elevation_deg=30.0, distance=2.5, fovy_deg=40.0, height=9, width=9)
    assert len(cams) == 8
    assert torch.allclose(cams.positions.norm(dim=-1), torch.full((8,), 2.5))
    assert torch.allclose(cams.azimuth_deg, torch.arange(8) * 45.0)
    # elevation: z = d sin(e); azimuth 0 is on +x
    assert torch.allclose(cams.positions[:, 2], torch.full((8,), 2.5 * math.sin(math.radians(30.0))))
    assert cams.positions[0, 0] > 0 and cams.positions[0, 1].abs() < 1e-6
    assert cams.positions[2, 1] > 0 and cams.positions[2, 0].abs() < 1e-5  # azimuth 90 deg is +y
    # the central pixel's ray passes through the origin
    origins, directions = cams.rays()
    centre = directions[:, 4, 4]
    closest = origins[:, 4, 4] + (-(origins[:, 4, 4] * centre).sum(-1, keepdim=True)) * centre
    assert closest.norm(dim=-1).max() < 1e-5
    assert torch.allclose(directions.norm(dim=-1), torch.ones(8, 9, 9), atol=1e-6)


def test_rays_mvp_and_opencv_intrinsics_agree_on_pixels():
    cams = orbit_cameras(3, elevation_deg=20.0, distance=3.0, fovy_deg=50.0, height=12, width=16)
    origins, directions = cams.rays()
    points = (origins + 1.7 * directions).reshape(3, -1, 3)
    rows, cols = torch.meshgrid(torch.arange(12) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    expected = torch.stack([cols, rows], dim=-1).reshape(1, -1, 2).expand(3, -1, -1)
    assert torch.allclose(_project_pixels(cams, points), expected, atol=1e-3)
    camera_points = torch.einsum("bij,bnj->bni", cams.viewmats_opencv()[:, :3, :3], points)
    camera_points = camera_points + cams.viewmats_opencv()[:, None, :3, 3]
    assert (camera_points[..., 2] > 0).all()
    pixels = torch.einsum("bij,bnj->bni", cams.intrinsics(), camera_points)
    assert torch.allclose(pixels[..., :2] / pixels[..., 2:], expected, atol=1e-3)


def test_world_up_projects_to_top_rows():
    cams = orbit_cameras(1, elevation_deg=0.0, distance=2.0, fovy_deg=60.0, height=32, width=32)
    pixel = _project_pixels(cams, torch.tensor([[[0.0, 0.0, 0.5]]]))
    assert pixel[0, 0, 1] < 16  # above the centre of the image
    assert pixel[0, 0, 0] == pytest.approx(16.0, abs=1e-4)


def test_cameras_index_and_move():
    cams = orbit_cameras(4, height=8, width=8)
    assert len(cams[1]) == 1 and torch.equal(cams[1].c2w[0], cams.c2w[1])
    assert len(cams[1:3]) == 2
    assert cams.to("cpu").c2w.device.type == "cpu"
