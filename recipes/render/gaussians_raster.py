"""Differentiable 3D Gaussian splatting: a dense pure-torch reference and gsplat as the fast CUDA backend.

The torch path projects every Gaussian (EWA: 2D covariance J W Σ Wᵀ Jᵀ + 0.3 I, as 3DGS), sorts by
depth and alpha-composites them front to back. By default (``compositor="tiled"``) each 8 × 8 pixel tile
blends only the Gaussians that can reach it (alpha ≥ 1/255); ``"fused"`` and ``"dense"`` blend every
visible Gaussian over every pixel, O(N·H·W), with a hand-written or an autograd backward. All three agree
to float rounding in values and gradients. ``backend="gsplat"`` calls ``gsplat.rasterization`` (imported
only then); ``"auto"`` picks gsplat for CUDA tensors when it is installed. The choice is logged once.

Cameras follow :mod:`recipes.data.cameras` (OpenGL c2w, z-up world, row 0 at the top).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.geometry.backend import require_cuda
from recipes.geometry.gaussians import covariances

log = logging.getLogger(__name__)

GaussianBackend = Literal["auto", "torch", "gsplat"]
TorchCompositor = Literal["fused", "dense", "tiled"]
_announced: set[str] = set()

ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
LOW_PASS = 0.3


@dataclass
class GaussianRender:
    """What a splat render returns; images are ``[B, H, W, C]``.

    Attributes:
        rgb: colour composited over the background.
        alpha: accumulated opacity.
        depth: alpha-weighted depth along the optical axis (divide by ``alpha`` for the mean depth).
        means2d: ``[B, N, 2]`` projected centres in pixels; its ``.grad`` after backward feeds
            the densification statistics (it retains its gradient when the inputs require one).
        radii: ``[B, N]`` screen radius in pixels, 0 where the Gaussian is culled.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    means2d: Tensor
    radii: Tensor


def resolve_backend(backend: GaussianBackend, device: torch.device) -> str:
    """Turn the ``backend`` setting into ``"torch"`` or ``"gsplat"``; error if gsplat is asked for but missing."""
    has_gsplat = importlib.util.find_spec("gsplat") is not None
    if backend == "auto":
        backend = "gsplat" if device.type == "cuda" and has_gsplat else "torch"
    elif backend == "gsplat":
        require_cuda("Gaussian rasterizer", "gsplat", device, "backend: torch (or auto)")
        if not has_gsplat:
            raise ImportError(
                "backend='gsplat' needs gsplat: pip install 'lightning-picard[gpu]' (CUDA only)"
            )
    elif backend not in ("torch", "gsplat"):
        raise ValueError(f"unknown Gaussian rasterizer backend {backend!r}; use 'auto', 'torch' or 'gsplat'")
    if backend not in _announced:
        _announced.add(backend)
        log.info("Gaussian rasterizer backend: %s", backend)
    return backend


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, cameras: Cameras, near: float = 0.01
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection into every camera: means2d ``[B, N, 2]`` (pixels), conics ``[B, N, 3]`` (a, b, c of
    the inverse 2D covariance), depths ``[B, N]`` and integer-valued radii ``[B, N]`` (0 = culled)."""
    w2c = cameras.w2c().to(means.dtype)
    focal = cameras.focal.to(means.dtype)[:, None]
    width, height = cameras.width, cameras.height
    p_cam = torch.einsum("bij,nj->bni", w2c[:, :3, :3], means) + w2c[:, None, :3, 3]
    depth = -p_cam[..., 2]
    safe_depth = depth.clamp_min(near)
    u = 0.5 * width + focal * p_cam[..., 0] / safe_depth
    v = 0.5 * height - focal * p_cam[..., 1] / safe_depth
    means2d = torch.stack([u, v], dim=-1)

    # Jacobian of (u, v) w.r.t. camera coordinates, with x/d, y/d clamped like 3DGS for far off-screen points.
    lim_x = 1.3 * 0.5 * width / focal
    lim_y = 1.3 * 0.5 * height / focal
    tx = torch.maximum(torch.minimum(p_cam[..., 0] / safe_depth, lim_x), -lim_x) * safe_depth
    ty = torch.maximum(torch.minimum(p_cam[..., 1] / safe_depth, lim_y), -lim_y) * safe_depth
    zero = torch.zeros_like(safe_depth)
    f_d = focal / safe_depth
    jac = torch.stack(
        [
            torch.stack([f_d, zero, f_d * tx / safe_depth], dim=-1),
            torch.stack([zero, -f_d, -f_d * ty / safe_depth], dim=-1),
        ],
        dim=-2,
    )
    cov_world = covariances(quats, scales)
    rot = w2c[:, None, :3, :3]
    cov_cam = rot @ cov_world[None] @ rot.transpose(-1, -2)
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)
    a = cov2d[..., 0, 0] + LOW_PASS
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + LOW_PASS
    det = a * c - b * b
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda_max = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
        radii = torch.ceil(3.0 * torch.sqrt(lambda_max))
        on_screen = (u + radii > 0) & (u - radii < width) & (v + radii > 0) & (v - radii < height)
        visible = (depth > near) & (det > 0) & on_screen
        radii = torch.where(visible, radii, torch.zeros_like(radii))
    return means2d, conics, depth, radii


def composite_dense(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    radii: Tensor,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of the visible Gaussians of one camera over every pixel centre.

    Inputs are for one camera (``means2d [N, 2]``, ``conics [N, 3]``, ``depths``/``radii``/``opacities``
    ``[N]``, ``colors [N, C]``). Returns colour ``[H, W, C]`` (no background), alpha and depth ``[H, W, 1]``.
    """
    order = _depth_order(depths, radii)
    pixels = _pixel_centres(width, height, means2d.dtype, means2d.device)
    delta = pixels[None] - means2d[order][:, None]  # [M, HW, 2]
    conic = conics[order]
    power = (
        -0.5 * (conic[:, None, 0] * delta[..., 0] ** 2 + conic[:, None, 2] * delta[..., 1] ** 2)
        - conic[:, None, 1] * delta[..., 0] * delta[..., 1]
    )
    alpha = (opacities[order][:, None] * torch.exp(power.clamp_max(0.0))).clamp_max(ALPHA_MAX)
    alpha = torch.where((power <= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha[:-1]]), dim=0)
    weights = alpha * transmittance  # [M, HW]
    color = weights.T @ colors[order]
    acc = weights.sum(dim=0)[:, None]
    depth = weights.T @ depths[order][:, None]
    return color.reshape(height, width, -1), acc.reshape(height, width, 1), depth.reshape(height, width, 1)


def composite_fused(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    radii: Tensor,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`composite_dense` as one autograd node with a hand-written backward (same inputs and outputs).

    The forward computes the same per-pixel alphas, transmittances and weights as :func:`composite_dense`;
    the backward uses the closed-form gradient of front-to-back compositing (3DGS: ∂C/∂αᵢ = Tᵢ qᵢ −
    Σ_{j>i} wⱼ qⱼ / (1 − αᵢ)) instead of differentiating through ``cumprod``, and keeps only a few
    ``[M, H·W]`` intermediates. It agrees with :func:`composite_dense` to float rounding, values and
    gradients (tests/recipes/test_gaussians.py), and is about 3× faster on a CPU.
    """
    order = _depth_order(depths, radii)
    pixels = _pixel_centres(width, height, means2d.dtype, means2d.device)
    features = torch.cat([colors[order], depths[order][:, None]], dim=1)
    out, acc = _FusedComposite.apply(means2d[order], conics[order], opacities[order], features, pixels)
    color, depth = out[:, :-1], out[:, -1:]
    return color.reshape(height, width, -1), acc.reshape(height, width, 1), depth.reshape(height, width, 1)


class _FusedComposite(torch.autograd.Function):
    """Front-to-back compositing of M depth-sorted Gaussians over P pixels: (Σ wᵢ fᵢ ``[P, F]``, Σ wᵢ ``[P]``)."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, pixels: Tensor):
        dx = pixels[None, :, 0] - means2d[:, 0:1]  # [M, P]
        dy = pixels[None, :, 1] - means2d[:, 1:2]
        a, b, c = conics[:, 0:1], conics[:, 1:2], conics[:, 2:3]
        # The same floating-point operations, in the same order, as composite_dense.
        power = (dx * dx).mul_(a).add_((dy * dy).mul_(c)).mul_(-0.5).sub_((b * dx).mul_(dy))
        raw = power.clamp_max(0.0).exp_().mul_(opacities[:, None])
        alpha = raw.clamp_max(ALPHA_MAX)
        valid = (power <= 0) & (alpha >= ALPHA_MIN)
        alpha.masked_fill_(~valid, 0.0)
        passes = valid & (raw <= ALPHA_MAX)  # where α = o·G(x) and the gradient flows
        del power, raw
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha[:-1]]), dim=0)
        weights = alpha * transmittance
        out = weights.T @ features
        acc = weights.sum(dim=0)
        ctx.save_for_backward(conics, opacities, features, dx, dy, alpha, transmittance, weights, passes)
        return out, acc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, grad_acc: Tensor):
        conics, opacities, features, dx, dy, alpha, transmittance, weights, passes = ctx.saved_tensors
        # qᵢ(p): how much pixel p's loss changes per unit of weight on Gaussian i.
        q = (features @ grad_out.T).add_(grad_acc[None])
        grad_features = weights @ grad_out
        weighted = weights * q
        behind = torch.zeros_like(weighted)  # Σ_{j>i} wⱼ qⱼ, summed from the back for accuracy
        if weighted.shape[0] > 1:
            behind[:-1] = torch.flip(torch.cumsum(torch.flip(weighted[1:], (0,)), dim=0), (0,))
        grad_alpha = (transmittance * q).sub_(behind.div_(1 - alpha))
        grad_power = grad_alpha.mul_(alpha).masked_fill_(~passes, 0.0)  # ∂α/∂power = α where it passes
        grad_opacities = grad_power.sum(dim=1) / opacities
        u, v = grad_power * dx, grad_power * dy
        sum_u, sum_v = u.sum(dim=1), v.sum(dim=1)
        a, b, c = conics.unbind(-1)
        grad_means2d = torch.stack([a * sum_u + b * sum_v, c * sum_v + b * sum_u], dim=-1)
        grad_conics = torch.stack(
            [-0.5 * (u * dx).sum(dim=1), -(u * dy).sum(dim=1), -0.5 * (v * dy).sum(dim=1)], dim=-1
        )
        return grad_means2d, grad_conics, grad_opacities, grad_features, None


def composite_tiled(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    radii: Tensor,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    tile: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`composite_fused` over ``tile × tile`` pixel tiles, each blending only the Gaussians that can reach it.

    A Gaussian adds nothing where its alpha o·exp(−d²/2) is below 1/255, i.e. beyond the Mahalanobis
    distance √(2 ln(255 o)); the tiles it skips are exactly those its bounding circle of that radius
    misses, so the result equals :func:`composite_fused` to float rounding (tests). Tiles are padded to the
    largest per-tile count and computed in one batch. Same inputs and outputs as :func:`composite_dense`.
    """
    order = _depth_order(depths, radii)
    dtype, device = means2d.dtype, means2d.device
    means, conic, opacity = means2d[order], conics[order], opacities[order]
    features = torch.cat([colors[order], depths[order][:, None]], dim=1)
    tiles_y, tiles_x = -(-height // tile), -(-width // tile)
    with torch.no_grad():
        # Largest screen distance at which alpha can still reach 1/255 (+0.5 px of margin).
        mid = 0.5 * (conic[:, 0] + conic[:, 2])
        lambda_min = mid - torch.sqrt(
            (mid * mid - (conic[:, 0] * conic[:, 2] - conic[:, 1] ** 2)).clamp_min(0.0)
        )
        reach = (
            torch.sqrt(2.0 * torch.log((opacity / ALPHA_MIN).clamp_min(1.0)) / lambda_min.clamp_min(1e-12))
            + 0.5
        )
        x0 = torch.arange(tiles_x, device=device, dtype=dtype) * tile  # tile extents in pixel coordinates
        y0 = torch.arange(tiles_y, device=device, dtype=dtype) * tile
        near_x = (means[None, :, 0] + reach >= x0[:, None]) & (
            means[None, :, 0] - reach <= x0[:, None] + tile
        )
        near_y = (means[None, :, 1] + reach >= y0[:, None]) & (
            means[None, :, 1] - reach <= y0[:, None] + tile
        )
        overlap = (near_y[:, None, :] & near_x[None, :, :]).reshape(tiles_y * tiles_x, -1)  # [T, M]
        overlap &= (opacity >= ALPHA_MIN)[None]  # fainter ones never reach 1/255
        count = overlap.sum(dim=1)
        k = max(int(count.max()) if count.numel() else 0, 1)
        # Overlapping Gaussians first, in depth order (stable sort keeps the order within each group).
        index = torch.sort((~overlap).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        present = torch.arange(k, device=device)[None] < count[:, None]  # [T, K]
        if means.shape[0] == 0:  # nothing visible: every slot points at the zero row appended below
            index = torch.zeros_like(present, dtype=torch.long)
    ys = (torch.arange(tiles_y * tile, device=device, dtype=dtype) + 0.5).reshape(tiles_y, 1, tile, 1)
    xs = (torch.arange(tiles_x * tile, device=device, dtype=dtype) + 0.5).reshape(1, tiles_x, 1, tile)
    pixels = torch.stack(torch.broadcast_tensors(xs, ys), dim=-1).reshape(tiles_y * tiles_x, tile * tile, 2)
    if means.shape[0] == 0:  # keep the (empty) inputs in the graph, with one zero row to point at
        means, conic = torch.cat([means, means.new_zeros(1, 2)]), torch.cat([conic, conic.new_zeros(1, 3)])
        opacity = torch.cat([opacity, opacity.new_ones(1)])
        features = torch.cat([features, features.new_zeros(1, features.shape[1])])
    out, acc = _TiledComposite.apply(means, conic, opacity, features, pixels, index, present)

    # [T, S, F] → [H, W, F], dropping the padding of partial tiles.
    def untile(x: Tensor) -> Tensor:
        x = x.reshape(tiles_y, tiles_x, tile, tile, -1).permute(0, 2, 1, 3, 4)
        return x.reshape(tiles_y * tile, tiles_x * tile, -1)[:height, :width]

    out, acc = untile(out), untile(acc[..., None])
    return out[..., :-1], acc, out[..., -1:]


class _TiledComposite(torch.autograd.Function):
    """:class:`_FusedComposite` batched over tiles: tile t blends Gaussians ``index[t]`` (where ``present``)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, pixels, index, present):
        m, cn, op = means2d[index], conics[index], opacities[index]  # [T, K, ·]
        dx = pixels[:, None, :, 0] - m[..., 0:1]  # [T, K, S]
        dy = pixels[:, None, :, 1] - m[..., 1:2]
        a, b, c = cn[..., 0:1], cn[..., 1:2], cn[..., 2:3]
        power = (dx * dx).mul_(a).add_((dy * dy).mul_(c)).mul_(-0.5).sub_((b * dx).mul_(dy))
        raw = power.clamp_max(0.0).exp_().mul_(op[..., None])
        alpha = raw.clamp_max(ALPHA_MAX)
        valid = (power <= 0) & (alpha >= ALPHA_MIN) & present[..., None]
        alpha.masked_fill_(~valid, 0.0)
        passes = valid & (raw <= ALPHA_MAX)
        del power, raw
        transmittance = torch.cumprod(
            torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], dim=1), dim=1
        )
        weights = alpha * transmittance
        feats = features[index]  # [T, K, F]
        out = torch.bmm(weights.transpose(1, 2), feats)  # [T, S, F]
        acc = weights.sum(dim=1)  # [T, S]
        ctx.save_for_backward(cn, op, feats, dx, dy, alpha, transmittance, weights, passes, index)
        ctx.num_gaussians = means2d.shape[0]
        return out, acc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_acc):
        cn, op, feats, dx, dy, alpha, transmittance, weights, passes, index = ctx.saved_tensors
        q = torch.bmm(feats, grad_out.transpose(1, 2)).add_(grad_acc[:, None])  # [T, K, S]
        grad_feats = torch.bmm(weights, grad_out)  # [T, K, F]
        weighted = weights * q
        behind = torch.zeros_like(weighted)
        if weighted.shape[1] > 1:
            behind[:, :-1] = torch.flip(torch.cumsum(torch.flip(weighted[:, 1:], (1,)), dim=1), (1,))
        grad_alpha = (transmittance * q).sub_(behind.div_(1 - alpha))
        grad_power = grad_alpha.mul_(alpha).masked_fill_(~passes, 0.0)
        grad_op = grad_power.sum(dim=2) / op
        u, v = grad_power * dx, grad_power * dy
        sum_u, sum_v = u.sum(dim=2), v.sum(dim=2)
        a, b, c = cn.unbind(-1)
        grad_m = torch.stack([a * sum_u + b * sum_v, c * sum_v + b * sum_u], dim=-1)
        grad_cn = torch.stack(
            [-0.5 * (u * dx).sum(dim=2), -(u * dy).sum(dim=2), -0.5 * (v * dy).sum(dim=2)], -1
        )
        n, flat = ctx.num_gaussians, index.reshape(-1)

        def scatter(per_tile: Tensor) -> Tensor:
            out = per_tile.new_zeros(n, *per_tile.shape[2:])
            return out.index_add_(0, flat, per_tile.reshape(flat.shape[0], *per_tile.shape[2:]))

        return scatter(grad_m), scatter(grad_cn), scatter(grad_op), scatter(grad_feats), None, None, None


def _depth_order(depths: Tensor, radii: Tensor) -> Tensor:
    """Indices of the visible Gaussians (positive radius), nearest first."""
    visible = torch.nonzero(radii > 0).squeeze(-1)
    return visible[torch.argsort(depths[visible])]


def _pixel_centres(width: int, height: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Pixel centres ``[H·W, 2]`` as (x, y), row-major from the top-left pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    background: Tensor | None = None,
    backend: GaussianBackend = "torch",
    near: float = 0.01,
    compositor: TorchCompositor = "tiled",
) -> GaussianRender:
    """Render N Gaussians (``means [N,3]``, wxyz ``quats [N,4]``, ``scales [N,3]``, ``opacities [N]``,
    ``colors [N,C]`` or ``[B,N,C]``) into every camera; ``background`` is ``[C]`` or ``[B,H,W,C]``.

    ``compositor`` picks the torch backend's compositing: ``"tiled"`` (:func:`composite_tiled`, 8 × 8 pixel
    tiles that blend only the Gaussians reaching them), ``"fused"`` (:func:`composite_fused`, every visible
    Gaussian over every pixel, one autograd node) or ``"dense"`` (:func:`composite_dense`, the same through
    plain autograd). All three agree to float rounding; tiled is the fastest, 1.3–14× faster than dense on a
    CPU (more for many small Gaussians), fused gives images bit-identical to dense. Default is ``"tiled"``.
    """
    if compositor not in ("fused", "dense", "tiled"):
        raise ValueError(f"unknown compositor {compositor!r}; use 'fused', 'dense' or 'tiled'")
    composite = {"fused": composite_fused, "dense": composite_dense, "tiled": composite_tiled}[compositor]
    chosen = resolve_backend(backend, means.device)
    if chosen == "gsplat":
        color, alpha, depth, means2d, radii = _rasterize_gsplat(
            means, quats, scales, opacities, colors, cameras, near
        )
    else:
        means2d, conics, depths, radii = project_gaussians(means, quats, scales, cameras, near)
        if means2d.requires_grad:
            means2d.retain_grad()
        per_view = [
            composite(
                means2d[b],
                conics[b],
                depths[b],
                radii[b],
                opacities,
                colors[b] if colors.dim() == 3 else colors,
                cameras.width,
                cameras.height,
            )
            for b in range(len(cameras))
        ]
        color, alpha, depth = (torch.stack(images) for images in zip(*per_view))
    if background is not None:
        color = color + (1 - alpha) * background.to(color)
    return GaussianRender(rgb=color, alpha=alpha, depth=depth, means2d=means2d, radii=radii)


def render_gaussians(
    gaussians,
    cameras: Cameras,
    background: Tensor | None = None,
    backend: GaussianBackend = "torch",
    compositor: TorchCompositor = "tiled",
) -> GaussianRender:
    """Render a :class:`~recipes.geometry.gaussians.Gaussians` module (activated parameters) into ``cameras``.

    ``compositor`` is passed to :func:`rasterize_gaussians`. Default is ``"tiled"``.
    """
    return rasterize_gaussians(
        gaussians.means,
        gaussians.rotations,
        gaussians.scales,
        gaussians.opacities,
        gaussians.colors,
        cameras,
        background=background,
        backend=backend,
        compositor=compositor,
    )


def _rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    near: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    import gsplat

    cams = cameras.to(means.device)
    rendered, alpha, meta = gsplat.rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats=cams.viewmats_opencv().to(means.dtype),
        Ks=cams.intrinsics().to(means.dtype),
        width=cams.width,
        height=cams.height,
        near_plane=near,
        eps2d=LOW_PASS,
        render_mode="RGB+D",
    )
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5 reports (x, y) radii
        radii = radii.amax(dim=-1)
    return rendered[..., :-1], alpha, rendered[..., -1:], means2d, radii.to(means.dtype)
