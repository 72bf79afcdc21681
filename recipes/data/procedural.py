"""A procedural ground-truth object: striped spheres and a box, ray cast analytically in pure torch.

It stands in for "the object the prompt describes" wherever no model weights exist: its renders from a
grid of reference cameras are the closed-form prior's training set, and its renders from held-out
cameras are the ground truth of novel-view PSNR/SSIM. Everything is built in code (no files); renders
are deterministic functions of the cameras.

Shading is Lambertian under one directional light fixed in the world (not at the camera), so the
object's appearance is view-independent and a 3D model can reproduce it exactly. Background is white.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from recipes.data.cameras import Cameras, cameras_from_spherical

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class StripedSphere:
    """A sphere coloured in alternating ``color`` / ``stripe_color`` bands along ``stripe_axis``."""

    center: Vec3
    radius: float
    color: Vec3
    stripe_color: Vec3
    stripe_axis: Vec3 = (0.0, 0.0, 1.0)
    stripes_per_unit: float = 3.0


@dataclass(frozen=True)
class StripedBox:
    """A box of half extents ``half_size``, turned by ``yaw_deg`` about z, striped along ``stripe_axis``."""

    center: Vec3
    half_size: Vec3
    color: Vec3
    stripe_color: Vec3
    yaw_deg: float = 0.0
    stripe_axis: Vec3 = (1.0, 0.0, 0.0)
    stripes_per_unit: float = 3.0


class ProceduralRender(NamedTuple):
    """Renders: ``rgb [B, 3, H, W]`` in [0, 1] on white, coverage ``alpha [B, 1, H, W]`` and the
    coverage-weighted distance along the ray ``depth [B, 1, H, W]`` (0 where nothing is hit; divide by
    ``alpha`` for the mean distance), the renderers' ``depth`` convention."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor


class _Hits(NamedTuple):
    distance: Tensor  # [B, H, W], inf where the ray misses
    normal: Tensor  # [B, H, W, 3], unit, world frame
    albedo: Tensor  # [B, H, W, 3]


@dataclass(frozen=True)
class ProceduralObject:
    """A set of opaque primitives lit by one directional light; ``render(cameras)`` ray casts it.

    Args:
        spheres, boxes: the primitives.
        light_direction: world direction towards the light (normalised internally).
        ambient: fraction of the albedo seen in full shadow; the rest scales with max(0, n·l).
        stripe_sharpness: steepness of the stripe edges (tanh of a sine; larger is crisper).
    """

    spheres: tuple[StripedSphere, ...] = ()
    boxes: tuple[StripedBox, ...] = ()
    light_direction: Vec3 = (0.4, 0.3, 1.0)
    ambient: float = 0.35
    stripe_sharpness: float = 4.0

    def render(self, cameras: Cameras, supersample: int = 2) -> ProceduralRender:
        """Render every camera at its resolution, averaging ``supersample²`` rays per pixel."""
        fine = cameras.with_resolution(cameras.height * supersample, cameras.width * supersample)
        rgb, alpha, depth = self._cast(fine)
        if supersample > 1:
            rgb, alpha, depth = (torch.nn.functional.avg_pool2d(x, supersample) for x in (rgb, alpha, depth))
        return ProceduralRender(rgb=rgb, alpha=alpha, depth=depth)

    def _cast(self, cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
        origins, directions = cameras.rays()
        hits = [self._hit_sphere(s, origins, directions) for s in self.spheres]
        hits += [self._hit_box(b, origins, directions) for b in self.boxes]
        if not hits:
            shape = (len(cameras), 1, cameras.height, cameras.width)
            white = torch.ones(shape, dtype=origins.dtype, device=origins.device)
            return white.expand(-1, 3, -1, -1).clone(), torch.zeros_like(white), torch.zeros_like(white)
        distance = torch.stack([h.distance for h in hits])
        nearest = distance.argmin(dim=0, keepdim=True)
        nearest_distance = distance.gather(0, nearest)[0]
        covered = torch.isfinite(nearest_distance)

        def pick(field: Tensor) -> Tensor:
            index = nearest[..., None].expand(1, *field.shape[1:])
            return field.gather(0, index)[0]

        normal = pick(torch.stack([h.normal for h in hits]))
        albedo = pick(torch.stack([h.albedo for h in hits]))
        light = torch.nn.functional.normalize(torch.tensor(self.light_direction, dtype=origins.dtype), dim=0)
        lambert = (normal @ light.to(origins.device)).clamp(min=0.0)[..., None]
        shaded = albedo * (self.ambient + (1.0 - self.ambient) * lambert)
        mask = covered[..., None].to(origins.dtype)
        rgb = (shaded * mask + (1.0 - mask)).clamp(0.0, 1.0)
        depth = torch.where(covered, nearest_distance, torch.zeros_like(nearest_distance))[:, None]
        return rgb.permute(0, 3, 1, 2).contiguous(), mask.permute(0, 3, 1, 2).contiguous(), depth

    def _stripes(
        self, coordinate: Tensor, stripes_per_unit: float, color: Vec3, stripe_color: Vec3
    ) -> Tensor:
        band = 0.5 + 0.5 * torch.tanh(
            self.stripe_sharpness * torch.sin(math.pi * stripes_per_unit * coordinate)
        )
        base = torch.tensor(color, dtype=coordinate.dtype, device=coordinate.device)
        stripe = torch.tensor(stripe_color, dtype=coordinate.dtype, device=coordinate.device)
        return base + band[..., None] * (stripe - base)

    def _hit_sphere(self, sphere: StripedSphere, origins: Tensor, directions: Tensor) -> _Hits:
        center = torch.tensor(sphere.center, dtype=origins.dtype, device=origins.device)
        offset = origins - center
        half_b = (offset * directions).sum(-1)
        discriminant = half_b.square() - (offset.square().sum(-1) - sphere.radius**2)
        distance = -half_b - discriminant.clamp(min=0.0).sqrt()
        hit = (discriminant > 0) & (distance > 0)
        distance = torch.where(hit, distance, torch.full_like(distance, math.inf))
        local = offset + distance.nan_to_num(posinf=0.0)[..., None] * directions
        normal = torch.nn.functional.normalize(local, dim=-1)
        axis = torch.nn.functional.normalize(torch.tensor(sphere.stripe_axis, dtype=origins.dtype), dim=0)
        albedo = self._stripes(
            local @ axis.to(origins.device), sphere.stripes_per_unit, sphere.color, sphere.stripe_color
        )
        return _Hits(distance, normal, albedo)

    def _hit_box(self, box: StripedBox, origins: Tensor, directions: Tensor) -> _Hits:
        dtype, device = origins.dtype, origins.device
        yaw = math.radians(box.yaw_deg)
        # Columns are the box's local axes in world coordinates.
        rotation = torch.tensor(
            [[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]],
            dtype=dtype,
            device=device,
        )
        center = torch.tensor(box.center, dtype=dtype, device=device)
        half = torch.tensor(box.half_size, dtype=dtype, device=device)
        local_origins = (origins - center) @ rotation
        local_directions = directions @ rotation
        tiny = torch.finfo(dtype).tiny
        safe = torch.where(
            local_directions.abs() < tiny, torch.full_like(local_directions, tiny), local_directions
        )
        t_low = (-half - local_origins) / safe
        t_high = (half - local_origins) / safe
        t_near = torch.minimum(t_low, t_high)
        entry, entry_axis = t_near.max(dim=-1)
        exit_ = torch.maximum(t_low, t_high).min(dim=-1).values
        hit = (entry <= exit_) & (entry > 0)
        distance = torch.where(hit, entry, torch.full_like(entry, math.inf))
        sign = -torch.sign(local_directions.gather(-1, entry_axis[..., None]))
        local_normal = torch.nn.functional.one_hot(entry_axis, 3).to(dtype) * sign
        normal = local_normal @ rotation.T
        local_points = local_origins + entry.clamp(min=0.0)[..., None] * local_directions
        axis = torch.nn.functional.normalize(torch.tensor(box.stripe_axis, dtype=dtype), dim=0).to(device)
        albedo = self._stripes(local_points @ axis, box.stripes_per_unit, box.color, box.stripe_color)
        return _Hits(distance, normal, albedo)


def default_procedural_object() -> ProceduralObject:
    """Three striped spheres and a turned striped box, all within radius 0.8 of the origin.

    No symmetry axis: every azimuth and elevation sees a different arrangement, so views are distinguishable.
    """
    red, cream, blue, yellow, green, black = (
        (0.85, 0.15, 0.12), (0.98, 0.92, 0.80), (0.15, 0.30, 0.85),
        (0.95, 0.85, 0.15), (0.10, 0.65, 0.25), (0.10, 0.10, 0.12),
    )  # fmt: skip
    x_axis, y_axis, z_axis = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    return ProceduralObject(
        spheres=(
            StripedSphere((0.0, 0.0, 0.05), 0.38, red, cream, z_axis, stripes_per_unit=5.0),
            StripedSphere((0.45, -0.35, -0.15), 0.22, blue, yellow, x_axis, stripes_per_unit=7.0),
            StripedSphere((-0.35, 0.45, 0.25), 0.20, green, black, y_axis, stripes_per_unit=7.0),
        ),
        boxes=(
            StripedBox(
                center=(-0.35, -0.45, -0.35),
                half_size=(0.22, 0.15, 0.18),
                color=(0.95, 0.55, 0.10),
                stripe_color=(0.45, 0.15, 0.55),
                yaw_deg=30.0,
                stripe_axis=x_axis,
                stripes_per_unit=6.0,
            ),
        ),
    )


def spherical_cameras(
    elevation_deg: Sequence[float] | Tensor,
    azimuth_deg: Sequence[float] | Tensor,
    distance: float = 3.0,
    fovy_deg: float = 40.0,
    height: int = 32,
    width: int = 32,
) -> Cameras:
    """Cameras at paired (elevation, azimuth) positions looking at the origin (procedural defaults)."""
    elevation = torch.as_tensor(elevation_deg, dtype=torch.float32)
    azimuth = torch.as_tensor(azimuth_deg, dtype=torch.float32)
    full = torch.ones_like(elevation)
    return cameras_from_spherical(elevation, azimuth, distance * full, fovy_deg * full, height, width)


def reference_cameras(
    num_azimuths: int = 12,
    elevations_deg: Sequence[float] = (-10.0, 20.0, 50.0),
    distance: float = 3.0,
    fovy_deg: float = 40.0,
    height: int = 32,
    width: int = 32,
) -> Cameras:
    """The reference grid: azimuths 0, 360/n, … at each elevation, in elevation-major order."""
    azimuths = torch.arange(num_azimuths, dtype=torch.float32) * (360.0 / num_azimuths)
    elevations = torch.tensor(elevations_deg, dtype=torch.float32)
    grid_elevation, grid_azimuth = torch.meshgrid(elevations, azimuths, indexing="ij")
    return spherical_cameras(
        grid_elevation.flatten(), grid_azimuth.flatten(), distance, fovy_deg, height, width
    )


def held_out_cameras(
    num_views: int = 8,
    elevations_deg: Sequence[float] = (5.0, 35.0),
    distance: float = 3.0,
    fovy_deg: float = 40.0,
    height: int = 32,
    width: int = 32,
) -> Cameras:
    """Novel views for evaluation: azimuths 15 + k·360/n, elevations cycling through ``elevations_deg``.

    With the defaults (8 views, 5°/35°) none coincides with a reference camera.
    """
    azimuths = 15.0 + torch.arange(num_views, dtype=torch.float32) * (360.0 / num_views)
    elevations = torch.tensor(elevations_deg, dtype=torch.float32).repeat(
        math.ceil(num_views / len(elevations_deg))
    )
    return spherical_cameras(elevations[:num_views], azimuths, distance, fovy_deg, height, width)
