"""Volume rendering of a density field (NeRF) with a material and a background.

Rays march through the scene box ``[-radius, radius]^3`` at a fixed step
``render_step_size = 2·√3·radius / num_samples_per_ray`` (threestudio/nerfacc), so a ray crossing the
whole diagonal gets ``num_samples_per_ray`` samples. Samples in empty occupancy-grid cells are not
queried. Compositing is the usual ``α = 1 − exp(−σδ)``, ``w = α·∏(1 − α)``.

Randomness: in training the samples of each ray are shifted by one uniform offset in ``[0, δ)``
(stratified), the material picks a shading mode and the background may be randomised; all of it is
drawn from ``generator`` when given, otherwise from the global torch RNG (which the Picard strategy
seeds per step). In eval mode rendering is deterministic (offset δ/2, material default shading).

Backends: ``backend="torch"`` (default) is the reference and runs anywhere. ``backend="nerfacc"`` (CUDA,
nerfacc ≥ 0.5, imported lazily) marches with ``nerfacc.OccGridEstimator.sampling`` over this renderer's
own occupancy grid (its cells are copied in; the estimator is never updated by nerfacc, so the grid
stays a function of (field, step)) and composites with ``render_weight_from_alpha`` and
``accumulate_along_rays`` on packed samples. The samples lie on the same lattice ``near + (k + offset)·δ``;
for rays whose offset is below ½ nerfacc starts one step later, dropping the sample in the first half step
of the box. Outputs have the same keys and shapes. Asking for nerfacc without CUDA, or rendering CPU
tensors with it, raises :class:`~recipes.geometry.backend.BackendNeedsCUDAError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recipes.data.cameras import Cameras
from recipes.geometry.backend import import_backend, log_backend_once, require_cuda
from recipes.geometry.nerf import FieldOutput
from recipes.render.occupancy import OccupancyGrid, OccupancyGridConfig


def ray_box_intersection(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances ``[R]`` of rays with the box ``[-radius, radius]^3`` (entry ≥ 0; miss: exit ≤ entry)."""
    inverse = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (-radius - origins) * inverse
    t1 = (radius - origins) * inverse
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def sample_along_rays(
    near: Tensor, far: Tensor, step_size: float, n_samples: int, offset: Tensor
) -> tuple[Tensor, Tensor]:
    """Sample midpoints ``t [R, S]`` every ``step_size`` from ``near`` shifted by ``offset`` ``[R]`` (in units
    of the step), and the mask of samples before ``far``."""
    index = torch.arange(n_samples, dtype=near.dtype, device=near.device)
    t = near[:, None] + (index[None, :] + offset[:, None]) * step_size
    return t, t < far[:, None]


def composite_weights(alpha: Tensor) -> Tensor:
    """Front-to-back compositing weights ``α_i ∏_{j<i} (1 − α_j)`` along the last dimension."""
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1] + 1e-10], dim=-1), dim=-1
    )
    return alpha * transmittance


def scatter_samples(values: Tensor, mask: Tensor) -> Tensor:
    """Place per-sample values ``[M, ...]`` into a zero tensor shaped like ``mask`` ``[R, S]`` (+ trailing)."""
    dense = values.new_zeros(*mask.shape, *values.shape[1:])
    return dense.masked_scatter(mask.reshape(*mask.shape, *(1,) * (values.dim() - 1)), values)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def integrate(
    weights: Tensor, t: Tensor, mask: Tensor, rgb: Tensor, normal: Tensor | None
) -> dict[str, Tensor]:
    """Per-ray opacity, depth, z-variance, colour and normal from sample weights ``[R, S]``."""
    opacity = weights.sum(-1, keepdim=True)
    depth = (weights * t).sum(-1, keepdim=True)
    z_variance = (weights * (t - depth).square()).sum(-1, keepdim=True)
    out = {
        "comp_rgb_fg": (weights[..., None] * scatter_samples(rgb, mask)).sum(-2),
        "opacity": opacity,
        "depth": depth,
        "z_variance": z_variance,
    }
    if normal is not None:
        out["comp_normal"] = (weights[..., None] * scatter_samples(normal, mask)).sum(-2)
    return out


VolumeBackend = Literal["torch", "nerfacc"]


@dataclass
class VolumeRendererConfig:
    """threestudio ``nerf-volume-renderer`` settings (512 samples per diagonal, occupancy grid on).

    ``output_normal``: compute normals even when the material does not shade with them (the
    orientation loss needs them); they are computed anyway when it does. Default is False.
    """

    num_samples_per_ray: int = 512
    randomized: bool = True
    ray_chunk_size: int = 8192
    occupancy: OccupancyGridConfig = field(default_factory=OccupancyGridConfig)
    backend: VolumeBackend = "torch"
    output_normal: bool = False


class VolumeRenderer(nn.Module):
    """Render ``Cameras`` through a density field, a material and a background.

    Output (threestudio names): ``comp_rgb``, ``comp_rgb_fg``, ``comp_rgb_bg`` ``[B, H, W, 3]``,
    ``opacity``, ``depth``, ``z_variance`` ``[B, H, W, 1]``, ``comp_normal`` ``[B, H, W, 3]`` (world
    space, weighted sum of unit normals) when normals are computed, and per queried sample (packed,
    ``M`` samples): ``weights [M]``, ``normal [M, 3]``, ``t_dirs [M, 3]``, ``ray_index [M]`` for the
    orientation loss.
    """

    def __init__(
        self,
        geometry: nn.Module,
        material: nn.Module,
        background: nn.Module,
        config: VolumeRendererConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config if config is not None else VolumeRendererConfig()
        self.geometry = geometry
        self.material = material
        self.background = background
        self.radius: float = geometry.radius
        self.render_step_size = 2.0 * math.sqrt(3.0) * self.radius / config.num_samples_per_ray
        self.occupancy_grid = OccupancyGrid(self.radius, config.occupancy)
        if config.backend not in ("torch", "nerfacc"):
            raise ValueError(f"unknown volume renderer backend {config.backend!r}; use 'torch' or 'nerfacc'")
        self._nerfacc = import_backend(config.backend, "volume renderer")
        log_backend_once("volume renderer", config.backend)
        # nerfacc's estimator holds a copy of ``occupancy_grid.binary``; kept out of the state_dict.
        self._estimator: dict[str, Any] = {}

    def update_step(self, step: int) -> None:
        """Step schedules of every part and the occupancy-grid refresh; a pure function of (state, step).

        Call it before the forward of step ``step`` (and from the Picard replay hook).
        """
        for part in (self.geometry, self.material, self.background):
            if hasattr(part, "update_step"):
                part.update_step(step)
        self.occupancy_grid.update(step, self.occupancy_fn)

    def occupancy_fn(self, points: Tensor) -> Tensor:
        """Opacity of one render step at ``points``: ``σ·δ``."""
        return self.geometry.density(points) * self.render_step_size

    def _wants_normal(self) -> bool:
        wanted = bool(getattr(self.material, "requires_normal", False)) or self.config.output_normal
        return wanted and (self.geometry.config.normal_type != "none")

    def _alpha(self, sample: FieldOutput, directions: Tensor, deltas: Tensor) -> Tensor:
        return 1.0 - torch.exp(-sample.density * deltas)

    def _query(self, points: Tensor, with_normal: bool) -> FieldOutput:
        return self.geometry(points, with_normal=with_normal)

    def forward(
        self,
        cameras: Cameras,
        shading: str | None = None,
        ambient_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor | str]:
        if shading is None:
            if self.training:
                shading, ambient_ratio = self.material.sample_shading(generator)
            else:
                shading = self.material.default_shading()
        origins, directions = cameras.rays()
        batch, height, width = len(cameras), cameras.height, cameras.width
        light = cameras.light_positions[:, None, None, :].expand(-1, height, width, -1)
        origins, directions, light = (x.reshape(-1, 3) for x in (origins, directions, light))
        if self.training and self.config.randomized:
            offsets = _rand((origins.shape[0],), generator, origins.device)
        else:
            offsets = torch.full((origins.shape[0],), 0.5, device=origins.device)

        with_normal = self._wants_normal()
        render = self._render_rays
        if self._nerfacc is not None:
            require_cuda("volume renderer", "nerfacc", origins.device)
            render = self._render_rays_nerfacc
        chunks = [
            render(o, d, lp, off, shading, ambient_ratio, with_normal, first)
            for first, (o, d, lp, off) in zip(
                range(0, origins.shape[0], self.config.ray_chunk_size),
                zip(*(x.split(self.config.ray_chunk_size) for x in (origins, directions, light, offsets))),
            )
        ]
        out: dict[str, Tensor | str] = {}
        for key in chunks[0]:
            parts = [chunk[key] for chunk in chunks]
            out[key] = torch.cat(parts, dim=0)
        for key in ("comp_rgb_fg", "opacity", "depth", "z_variance", "comp_normal"):
            if key in out:
                out[key] = out[key].reshape(batch, height, width, -1)
        background = self.background(directions.reshape(batch, height, width, 3), generator=generator)
        out["comp_rgb_bg"] = background
        out["comp_rgb"] = out["comp_rgb_fg"] + background * (1.0 - out["opacity"])
        out["shading"] = shading
        return out

    def _render_rays(
        self,
        origins: Tensor,
        directions: Tensor,
        light: Tensor,
        offsets: Tensor,
        shading: str,
        ambient_ratio: float | None,
        with_normal: bool,
        first_ray: int,
    ) -> dict[str, Tensor]:
        near, far = ray_box_intersection(origins, directions, self.radius)
        longest = math.ceil(((far - near).clamp(min=0.0).max().item()) / self.render_step_size) + 1
        n_samples = max(1, min(longest, self.config.num_samples_per_ray + 1))
        t, mask = sample_along_rays(near, far, self.render_step_size, n_samples, offsets)
        points = origins[:, None, :] + t[..., None] * directions[:, None, :]
        mask = mask & self.occupancy_grid.occupied(points)
        ray_index = torch.nonzero(mask)[:, 0]
        sample_points = points[mask]
        sample_dirs = directions[ray_index]
        sample = self._query(sample_points, with_normal)
        deltas = torch.full_like(sample_points[:, 0], self.render_step_size)
        alpha = scatter_samples(self._alpha(sample, sample_dirs, deltas), mask)
        weights = composite_weights(alpha)
        rgb = self.material(
            sample.features, sample_points, sample.normal, light[ray_index], shading, ambient_ratio
        )
        out = integrate(weights, t, mask, rgb, sample.normal)
        out["weights"] = weights[mask]
        out["t_dirs"] = sample_dirs
        out["ray_index"] = ray_index + first_ray
        if sample.normal is not None:
            out["normal"] = sample.normal
        if sample.sdf_gradient is not None:
            out["sdf_gradient"] = sample.sdf_gradient
        return out

    def _occ_estimator(self, device: torch.device) -> Any:
        """A ``nerfacc.OccGridEstimator`` over the scene box whose cells are this renderer's occupancy grid."""
        estimator = self._estimator.get("grid")
        if estimator is None or estimator.binaries.device != device:
            r, res = self.radius, self.occupancy_grid.config.resolution
            estimator = self._nerfacc.OccGridEstimator([-r, -r, -r, r, r, r], resolution=res, levels=1)
            self._estimator["grid"] = estimator = estimator.to(device)
        # same cell layout: index (x·res + y)·res + z, cells of [-r, r]^3
        estimator.binaries.copy_(self.occupancy_grid.binary.view(estimator.binaries.shape))
        return estimator

    def _render_rays_nerfacc(
        self,
        origins: Tensor,
        directions: Tensor,
        light: Tensor,
        offsets: Tensor,
        shading: str,
        ambient_ratio: float | None,
        with_normal: bool,
        first_ray: int,
    ) -> dict[str, Tensor]:
        """``_render_rays`` with nerfacc's grid traversal and packed compositing (CUDA)."""
        nerfacc, step, n_rays = self._nerfacc, self.render_step_size, origins.shape[0]
        near, far = ray_box_intersection(origins, directions, self.radius)
        # nerfacc marches [t, t + δ) intervals from the box entry, i.e. midpoints near + (k + ½)·δ; starting
        # the rays at near + ((offset − ½) mod 1)·δ puts the midpoints on the torch lattice near + (k + offset)·δ.
        start = near + torch.remainder(offsets - 0.5, 1.0) * step
        shifted = origins + start[:, None] * directions
        with torch.no_grad():
            ray_index, t_starts, t_ends = self._occ_estimator(origins.device).sampling(
                shifted, directions, render_step_size=step, stratified=False, cone_angle=0.0, alpha_thre=0.0
            )
        ray_index = ray_index.long()
        t = start[ray_index] + 0.5 * (t_starts + t_ends)
        keep = t < far[ray_index]  # same end test as the torch path
        ray_index, t = ray_index[keep], t[keep]
        sample_dirs = directions[ray_index]
        sample_points = origins[ray_index] + t[:, None] * sample_dirs
        sample = self._query(sample_points, with_normal)
        alpha = self._alpha(sample, sample_dirs, torch.full_like(t, step))
        weights, _ = nerfacc.render_weight_from_alpha(alpha, ray_indices=ray_index, n_rays=n_rays)
        rgb = self.material(
            sample.features, sample_points, sample.normal, light[ray_index], shading, ambient_ratio
        )

        def accumulate(values: Tensor | None) -> Tensor:
            return nerfacc.accumulate_along_rays(weights, values=values, ray_indices=ray_index, n_rays=n_rays)

        depth = accumulate(t[:, None])
        out = {
            "comp_rgb_fg": accumulate(rgb),
            "opacity": accumulate(None),
            "depth": depth,
            "z_variance": accumulate((t - depth[ray_index, 0]).square()[:, None]),
        }
        if sample.normal is not None:
            out["comp_normal"] = accumulate(sample.normal)
        out["weights"] = weights
        out["t_dirs"] = sample_dirs
        out["ray_index"] = ray_index + first_ray
        if sample.normal is not None:
            out["normal"] = sample.normal
        if sample.sdf_gradient is not None:
            out["sdf_gradient"] = sample.sdf_gradient
        return out
