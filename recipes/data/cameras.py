"""Pinhole cameras shared by every renderer, prior and exporter in ``recipes``.

Conventions (stable; the mesh rasterizer, the Gaussian splatter and the closed-form prior rely on them):

- The world is **z-up**. Elevation is the angle above the xy-plane, azimuth is measured in the
  xy-plane from +x towards +y, both in degrees: a camera at elevation e, azimuth a, distance d sits at
  ``d · (cos e · cos a, cos e · sin a, sin e)``.
- Camera-to-world matrices ``c2w`` use the **OpenGL** camera frame: camera x points right, y up, and
  the camera looks along its −z axis. ``c2w[:, :3, 3]`` is the camera position.
- ``fovy`` is the vertical field of view in radians; pixels are square, so the focal length in pixels
  is ``0.5 · height / tan(fovy / 2)`` on both axes and the principal point is the image centre.
- Image row 0 is the **top** of the image, column 0 the left. Pixel (row i, column j) is sampled at its
  centre ``(j + 0.5, i + 0.5)``.
- ``projection()`` is the standard OpenGL clip matrix (NDC y = +1 at the top of the image, z ∈ [−1, 1]
  from near to far); a rasterizer that stores row 0 at NDC y = −1 must flip rows itself.
- ``intrinsics()`` / ``viewmats_opencv()`` give the OpenCV view (x right, y down, looking along +z) that
  gsplat-style splatters expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

WORLD_UP = (0.0, 0.0, 1.0)


def look_at(eye: Tensor, target: Tensor, up: Tensor | tuple[float, float, float] = WORLD_UP) -> Tensor:
    """Camera-to-world matrices ``[B, 4, 4]`` (OpenGL frame) for cameras at ``eye`` looking at ``target``.

    ``eye`` and ``target`` are ``[B, 3]``; ``up`` is one vector or ``[B, 3]`` and must not be parallel
    to the viewing direction.
    """
    up_vec = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_vec, dim=-1), dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_cartesian(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """Points ``[B, 3]`` at the given elevation/azimuth (degrees) and distance from the origin (z-up)."""
    elevation = torch.deg2rad(elevation_deg)
    azimuth = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


@dataclass
class Cameras:
    """A batch of B pinhole cameras sharing one image size, plus the point light of each view.

    ``elevation_deg``, ``azimuth_deg`` and ``distance`` describe the nominal orbit position (before any
    perturbation); view-dependent prompting and camera-conditioned priors read them. ``c2w`` is the
    actual pose.
    """

    c2w: Tensor
    fovy: Tensor
    height: int
    width: int
    elevation_deg: Tensor
    azimuth_deg: Tensor
    distance: Tensor
    light_positions: Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def positions(self) -> Tensor:
        """Camera centres in world space, ``[B, 3]``."""
        return self.c2w[:, :3, 3]

    @property
    def focal(self) -> Tensor:
        """Focal length in pixels, ``[B]`` (same on both axes)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def to(self, device: torch.device | str) -> Cameras:
        """The same cameras with every tensor on ``device``."""
        return replace(
            self,
            c2w=self.c2w.to(device),
            fovy=self.fovy.to(device),
            elevation_deg=self.elevation_deg.to(device),
            azimuth_deg=self.azimuth_deg.to(device),
            distance=self.distance.to(device),
            light_positions=self.light_positions.to(device),
        )

    def __getitem__(self, index: int | slice | Tensor) -> Cameras:
        """A sub-batch (an integer index keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return replace(
            self,
            c2w=self.c2w[index],
            fovy=self.fovy[index],
            elevation_deg=self.elevation_deg[index],
            azimuth_deg=self.azimuth_deg[index],
            distance=self.distance[index],
            light_positions=self.light_positions[index],
        )

    @classmethod
    def cat(cls, batches: list[Cameras]) -> Cameras:
        """The camera batches one after another, as one batch (they must share an image size)."""
        sizes = {(c.height, c.width) for c in batches}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate cameras of different image sizes {sorted(sizes)}")
        return replace(
            batches[0],
            **{
                name: torch.cat([getattr(c, name) for c in batches])
                for name in ("c2w", "fovy", "elevation_deg", "azimuth_deg", "distance", "light_positions")
            },
        )

    def with_resolution(self, height: int, width: int) -> Cameras:
        """The same poses and vertical field of view rendered at another image size."""
        return replace(self, height=height, width=width)

    def camera_directions(self) -> Tensor:
        """Unnormalised per-pixel ray directions in the camera frame, ``[B, H, W, 3]`` (z = −1)."""
        dtype, device = self.c2w.dtype, self.c2w.device
        cols = torch.arange(self.width, dtype=dtype, device=device) + 0.5
        rows = torch.arange(self.height, dtype=dtype, device=device) + 0.5
        focal = self.focal[:, None, None]
        x = ((cols - 0.5 * self.width)[None, None, :] / focal).expand(-1, self.height, -1)
        y = (-(rows - 0.5 * self.height)[None, :, None] / focal).expand(-1, -1, self.width)
        return torch.stack([x, y, -torch.ones_like(x)], dim=-1)

    def rays(self) -> tuple[Tensor, Tensor]:
        """World-space ray origins and unit directions through every pixel centre, each ``[B, H, W, 3]``."""
        directions = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], self.camera_directions())
        directions = torch.nn.functional.normalize(directions, dim=-1)
        origins = self.positions[:, None, None, :].expand_as(directions)
        return origins, directions

    def intrinsics(self) -> Tensor:
        """OpenCV pixel intrinsics ``K`` ``[B, 3, 3]``: fx = fy = focal, principal point at the centre."""
        K = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.device)
        K[:, 0, 0] = self.focal
        K[:, 1, 1] = self.focal
        K[:, 0, 2] = 0.5 * self.width
        K[:, 1, 2] = 0.5 * self.height
        K[:, 2, 2] = 1.0
        return K

    def w2c(self) -> Tensor:
        """World-to-camera matrices ``[B, 4, 4]`` in the OpenGL camera frame."""
        rotation = self.c2w[:, :3, :3]
        w2c = torch.zeros_like(self.c2w)
        w2c[:, :3, :3] = rotation.transpose(1, 2)
        w2c[:, :3, 3] = -torch.einsum("bji,bj->bi", rotation, self.positions)
        w2c[:, 3, 3] = 1.0
        return w2c

    def viewmats_opencv(self) -> Tensor:
        """World-to-camera matrices ``[B, 4, 4]`` in the OpenCV frame (x right, y down, looking along +z)."""
        flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=self.c2w.dtype, device=self.device)
        return flip[None, :, None] * self.w2c()

    def projection(self, near: float = 0.01, far: float = 100.0) -> Tensor:
        """OpenGL perspective clip matrices ``[B, 4, 4]`` (NDC y = +1 is the top image row)."""
        tan_half = torch.tan(0.5 * self.fovy)
        aspect = self.width / self.height
        proj = torch.zeros(len(self), 4, 4, dtype=self.c2w.dtype, device=self.device)
        proj[:, 0, 0] = 1.0 / (tan_half * aspect)
        proj[:, 1, 1] = 1.0 / tan_half
        proj[:, 2, 2] = -(far + near) / (far - near)
        proj[:, 2, 3] = -2.0 * far * near / (far - near)
        proj[:, 3, 2] = -1.0
        return proj

    def mvp(self, near: float = 0.01, far: float = 100.0) -> Tensor:
        """World-to-clip matrices ``projection(near, far) @ w2c()``, ``[B, 4, 4]``."""
        return self.projection(near, far) @ self.w2c()


def cameras_from_spherical(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    distance: Tensor,
    fovy_deg: Tensor,
    height: int,
    width: int,
    light_positions: Tensor | None = None,
) -> Cameras:
    """Cameras on orbits around the origin, looking at it, with z up (light at the camera if not given)."""
    positions = spherical_to_cartesian(elevation_deg, azimuth_deg, distance)
    c2w = look_at(positions, torch.zeros_like(positions))
    return Cameras(
        c2w=c2w,
        fovy=torch.deg2rad(fovy_deg),
        height=height,
        width=width,
        elevation_deg=elevation_deg,
        azimuth_deg=azimuth_deg,
        distance=distance,
        light_positions=positions.clone() if light_positions is None else light_positions,
    )


def orbit_cameras(
    n: int,
    elevation_deg: float = 15.0,
    distance: float = 1.5,
    fovy_deg: float = 70.0,
    height: int = 512,
    width: int = 512,
) -> Cameras:
    """A turntable of ``n`` views at a fixed elevation and distance, azimuths ``0, 360/n, …`` degrees.

    Defaults follow threestudio's evaluation views (elevation 15°, distance 1.5, fovy 70°). The light
    sits at each camera.
    """
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = torch.full((n,), 1.0)
    return cameras_from_spherical(
        elevation_deg * full, azimuth, distance * full, fovy_deg * full, height, width
    )


def fovy_to_focal(fovy: float, height: int) -> float:
    """Focal length in pixels of a vertical field of view ``fovy`` (radians) over ``height`` pixels."""
    return 0.5 * height / math.tan(0.5 * fovy)
