"""Differentiable triangle rasterization: a pure-torch reference and nvdiffrast as the fast backend.

Three steps, as in nvdiffrast:

1. :func:`rasterize` finds the nearest face under every pixel centre (a z-buffer, no gradient) and
   returns its perspective-correct barycentrics, which *are* differentiable w.r.t. the clip-space
   vertices; gradients reach the vertices through everything interpolated inside the silhouette.
2. :func:`interpolate` spreads per-vertex attributes with those barycentrics.
3. :func:`antialias` gives the silhouette its gradient: pixels on either side of the object's
   outline get a coverage ``clamp(0.5 ± d, 0, 1)`` from their distance d (pixels) to the nearest
   silhouette edge (an edge between a front- and a back-facing face, or a boundary edge), and blend
   foreground and background colour with it.

The torch rasterizer enumerates, for each face, the pixel centres in its screen bounding box, so the
cost grows with the covered area rather than faces × pixels. Triangles that cross the near plane are
clipped there in homogeneous coordinates (:func:`clip_near`), as nvdiffrast does, instead of dropped. ``backend="nvdiffrast"`` (CUDA) is
imported only when chosen; ``"auto"`` picks it for CUDA tensors when installed. The choice is logged once.
Image row 0 is the top row (:mod:`recipes.data.cameras`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.geometry.backend import require_cuda
from recipes.geometry.mesh import TriangleMesh, edge_faces

log = logging.getLogger(__name__)

MeshBackend = Literal["auto", "torch", "nvdiffrast"]
_announced: set[str] = set()
_gl_contexts: dict[str, Any] = {}


@dataclass
class Rasterization:
    """Per-pixel visibility of a batch of B views of one triangle list.

    Attributes:
        face_id: ``[B, H, W]`` long, index of the visible face, −1 for background.
        bary: ``[B, H, W, 3]`` perspective-correct barycentrics of the visible face (0 on background),
            differentiable w.r.t. ``clip``.
        clip: ``[B, V, 3 or 4]`` clip-space vertices that were rasterized (homogeneous w last).
        faces: ``[F, 3]`` the triangles.
        native: backend-specific raw output (nvdiffrast's ``rast``), or None.
    """

    face_id: Tensor
    bary: Tensor
    clip: Tensor
    faces: Tensor
    native: Any = None

    @property
    def mask(self) -> Tensor:
        return self.face_id >= 0


def resolve_backend(backend: MeshBackend, device: torch.device) -> str:
    """Turn the ``backend`` setting into ``"torch"`` or ``"nvdiffrast"``; error if nvdiffrast is asked for but missing."""
    has_nvdiffrast = importlib.util.find_spec("nvdiffrast") is not None
    if backend == "auto":
        backend = "nvdiffrast" if device.type == "cuda" and has_nvdiffrast else "torch"
    elif backend == "nvdiffrast":
        require_cuda("mesh rasterizer", "nvdiffrast", device, "backend: torch (or auto)")
    if backend == "nvdiffrast" and not has_nvdiffrast:
        raise ImportError(
            "backend='nvdiffrast' needs nvdiffrast (CUDA): pip install git+https://github.com/NVlabs/nvdiffrast"
        )
    if backend not in ("torch", "nvdiffrast"):
        raise ValueError(f"unknown mesh rasterizer backend {backend!r}; use 'auto', 'torch' or 'nvdiffrast'")
    if backend not in _announced:
        _announced.add(backend)
        log.info("mesh rasterizer backend: %s", backend)
    return backend


def to_screen(clip: Tensor, height: int, width: int) -> Tensor:
    """Clip coordinates ``[..., 4]`` to (pixel x, pixel y, NDC z); row 0 (y = 0) is NDC y = +1."""
    ndc = clip[..., :3] / clip[..., 3:4]
    return torch.stack(
        [(ndc[..., 0] + 1) * 0.5 * width, (1 - ndc[..., 1]) * 0.5 * height, ndc[..., 2]], dim=-1
    )


def _edge_barycentrics(tri: Tensor, points: Tensor) -> Tensor:
    """Screen-space barycentrics ``[..., 3]`` of 2D ``points [..., 2]`` in triangles ``tri [..., 3, 2]``."""
    a, b, c = tri.unbind(-2)
    area = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
        c[..., 0] - a[..., 0]
    )
    safe = torch.where(area.abs() > 1e-12, area, torch.full_like(area, 1e-12))

    def cross(p: Tensor, q: Tensor) -> Tensor:
        return (q[..., 0] - p[..., 0]) * (points[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (
            points[..., 0] - p[..., 0]
        )

    return torch.stack([cross(b, c) / safe, cross(c, a) / safe, cross(a, b) / safe], dim=-1)


@torch.no_grad()
def _visible_faces(screen: Tensor, faces: Tensor, w: Tensor, height: int, width: int) -> Tensor:
    """Z-buffer of one view: ``[H·W]`` index of the nearest face whose interior holds each pixel centre, −1 if none."""
    tri = screen[faces]  # [F, 3, 3]
    front = (w[faces] > 1e-8).all(dim=-1)
    lo = tri[..., :2].amin(dim=1)
    hi = tri[..., :2].amax(dim=1)
    col0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    col1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    row0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    row1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    ncol = (col1 - col0 + 1).clamp_min(0) * front
    nrow = (row1 - row0 + 1).clamp_min(0) * front
    count = ncol * nrow
    face_id = torch.full((height * width,), -1, dtype=torch.long, device=screen.device)
    total = int(count.sum())
    if total == 0:
        return face_id
    face = torch.repeat_interleave(torch.arange(faces.shape[0], device=screen.device), count)
    start = torch.cumsum(count, 0) - count
    local = torch.arange(total, device=screen.device) - start[face]
    col = col0[face] + local % ncol[face]
    row = row0[face] + local // ncol[face]
    centre = torch.stack([col + 0.5, row + 0.5], dim=-1).to(screen.dtype)
    bary = _edge_barycentrics(tri[face, :, :2], centre)
    inside = (bary >= 0).all(dim=-1)
    depth = (bary * tri[face, :, 2]).sum(-1)
    inside &= (depth >= -1 - 1e-5) & (depth <= 1)  # clipped pieces touch z = −1 up to rounding
    pixel, face, depth = (row * width + col)[inside], face[inside], depth[inside]
    nearest = torch.full((height * width,), float("inf"), dtype=depth.dtype, device=depth.device)
    nearest = nearest.scatter_reduce(0, pixel, depth, reduce="amin")
    winner = depth <= nearest[pixel]
    return face_id.scatter_reduce(0, pixel[winner], face[winner], reduce="amax")


@dataclass
class NearClipped:
    """One view's triangles clipped against the near plane ``z + w ≥ 0`` in homogeneous clip space.

    Attributes:
        clip: ``[V + N, 4]`` the view's vertices followed by the N new ones on the near plane.
        faces: ``[F', 3]`` the faces wholly in front, then the pieces of the crossing ones.
        parent: ``[F']`` the original face of each face.
        to_parent: ``[F', 3, 3]`` row k: the barycentrics, in the parent face, of corner k.
    """

    clip: Tensor
    faces: Tensor
    parent: Tensor
    to_parent: Tensor


def _edge_points(clip: Tensor, distance: Tensor, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """Points where the edges ``start → end`` (vertex indices) meet the near plane, and their parameter t."""
    t = distance[start] / (distance[start] - distance[end])
    return clip[start] + t[:, None] * (clip[end] - clip[start]), t


def clip_near(clip: Tensor, faces: Tensor) -> NearClipped:
    """Clip the triangles ``faces`` of one view ``clip [V, 4]`` against the near plane (OpenGL: z ≥ −w).

    A face with one corner in front keeps the triangle between it and the two crossing points; a face
    with two keeps the quadrilateral, as two triangles; a face with none is dropped. New vertices are
    interpolated linearly in clip space, which is where attributes are linear, so their barycentrics in
    the parent face are exact. The winding of every piece is its parent's.
    """
    distance = clip[:, 2] + clip[:, 3]
    inside = distance[faces] >= 0  # [F, 3]
    count = inside.sum(-1)
    eye = torch.eye(3, dtype=clip.dtype, device=clip.device)
    whole = torch.nonzero(count == 3)[:, 0]
    pieces_faces, pieces_parent, pieces_bary, new_points = (
        [faces[whole]],
        [whole],
        [eye.expand(len(whole), 3, 3)],
        [],
    )
    next_vertex = clip.shape[0]
    corner = torch.arange(3, device=clip.device)
    for kept in (1, 2):
        crossing = torch.nonzero(count == kept)[:, 0]
        if crossing.numel() == 0:
            continue
        # roll each face so that corner 0 is the lone vertex: inside when one is kept, outside when two
        lone = (inside[crossing] if kept == 1 else ~inside[crossing]).float().argmax(-1)
        order = (lone[:, None] + corner) % 3  # [C, 3] corner indices, cyclic, so the winding is kept
        v = faces[crossing].gather(1, order)
        p01, t01 = _edge_points(clip, distance, v[:, 0], v[:, 1])
        p02, t02 = _edge_points(clip, distance, v[:, 0], v[:, 2])
        n = crossing.numel()
        i01 = torch.arange(next_vertex, next_vertex + n, device=clip.device)
        i02 = i01 + n
        next_vertex += 2 * n
        new_points += [p01, p02]
        b0 = eye[order[:, 0]]
        b1, b2 = eye[order[:, 1]], eye[order[:, 2]]
        b01 = (1 - t01)[:, None] * b0 + t01[:, None] * b1
        b02 = (1 - t02)[:, None] * b0 + t02[:, None] * b2
        if kept == 1:  # the triangle (v0, p01, p02)
            pieces_faces.append(torch.stack([v[:, 0], i01, i02], -1))
            pieces_parent.append(crossing)
            pieces_bary.append(torch.stack([b0, b01, b02], 1))
        else:  # the quadrilateral p01, v1, v2, p02 as (p01, v1, v2) and (p01, v2, p02)
            pieces_faces += [torch.stack([i01, v[:, 1], v[:, 2]], -1), torch.stack([i01, v[:, 2], i02], -1)]
            pieces_parent += [crossing, crossing]
            pieces_bary += [torch.stack([b01, b1, b2], 1), torch.stack([b01, b2, b02], 1)]
    return NearClipped(
        clip=torch.cat([clip, *new_points]),
        faces=torch.cat(pieces_faces),
        parent=torch.cat(pieces_parent),
        to_parent=torch.cat(pieces_bary),
    )


def _rasterize_view(clip: Tensor, faces: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Face id ``[H, W]`` and perspective-correct barycentrics ``[H, W, 3]`` of one view ``clip [V, 4]``."""
    clipped = None
    if bool((clip[:, 2] + clip[:, 3] < 0).any()):
        clipped = clip_near(clip, faces)
        clip, faces = clipped.clip, clipped.faces
    screen = to_screen(clip, height, width)
    face_id = _visible_faces(screen, faces, clip[:, 3], height, width).reshape(height, width)
    rows, cols = torch.meshgrid(
        torch.arange(height, device=clip.device), torch.arange(width, device=clip.device), indexing="ij"
    )
    centres = torch.stack([cols + 0.5, rows + 0.5], dim=-1).to(clip.dtype)
    safe_face = face_id.clamp_min(0)
    corners = faces[safe_face]  # [H, W, 3]
    linear = _edge_barycentrics(screen[corners][..., :2], centres)
    # background pixels (face 0 stands in) get the centroid, so that the division below never sees a zero sum:
    # 0/0 there is masked in the forward, but its gradient would be NaN
    linear = torch.where((face_id >= 0)[..., None], linear, torch.full_like(linear, 1.0 / 3.0))
    # screen-space barycentrics → perspective-correct ones: weight each corner by 1/w
    perspective = linear * (1.0 / clip[corners, 3])
    bary = perspective / perspective.sum(-1, keepdim=True)
    if clipped is not None:  # barycentrics in a piece → in its parent face
        bary = torch.einsum("hwk,hwkj->hwj", bary, clipped.to_parent[safe_face])
        face_id = torch.where(face_id >= 0, clipped.parent[safe_face], face_id)
    bary = torch.where((face_id >= 0)[..., None], bary, torch.zeros_like(bary))
    return face_id, bary


def rasterize(
    clip: Tensor, faces: Tensor, height: int, width: int, backend: MeshBackend = "torch"
) -> Rasterization:
    """Rasterize clip-space vertices ``[B, V, 4]`` (or ``[V, 4]``, shared by all views) of ``faces [F, 3]``.

    Triangles crossing the near plane are clipped there (:func:`clip_near`), as nvdiffrast does; the
    barycentrics returned are always those of the original face.
    """
    if clip.dim() == 2:
        clip = clip[None]
    faces = faces.long()
    if resolve_backend(backend, clip.device) == "nvdiffrast":
        return _rasterize_nvdiffrast(clip, faces, height, width)
    views = [_rasterize_view(clip[b], faces, height, width) for b in range(clip.shape[0])]
    face_id = torch.stack([view[0] for view in views])
    bary = torch.stack([view[1] for view in views])
    return Rasterization(face_id=face_id, bary=bary, clip=clip, faces=faces)


def interpolate(attributes: Tensor, rast: Rasterization) -> Tensor:
    """Per-pixel attributes ``[B, H, W, C]`` from per-vertex ``[V, C]`` or ``[B, V, C]`` (0 on background)."""
    if attributes.dim() == 2:
        corners = attributes[rast.faces[rast.face_id.clamp_min(0)]]  # [B, H, W, 3, C]
    else:
        batch = torch.arange(attributes.shape[0], device=attributes.device)[:, None, None, None]
        corners = attributes[batch, rast.faces[rast.face_id.clamp_min(0)]]
    return (rast.bary[..., None] * corners).sum(dim=-2)


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _shift(image: Tensor, dy: int, dx: int, fill: float | bool) -> Tensor:
    """``out[:, y, x] = image[:, y + dy, x + dx]`` with ``fill`` outside the image."""
    out = torch.full_like(image, fill)
    h, w = image.shape[1:3]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[:, yd, xd] = image[:, ys, xs]
    return out


def _silhouette_edges(screen: Tensor, faces: Tensor) -> Tensor:
    """Edges ``[S, 2]`` of one view whose adjacent faces face opposite ways on screen, or with one face."""
    edges, adjacent = edge_faces(faces)
    tri = screen[faces][..., :2].detach()
    signed = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 1, 1] - tri[:, 0, 1]) * (
        tri[:, 2, 0] - tri[:, 0, 0]
    )
    facing = signed > 0
    boundary = adjacent[:, 1] < 0
    flips = facing[adjacent[:, 0]] != facing[adjacent[:, 1].clamp_min(0)]
    return edges[boundary | flips]


def _silhouette_segments_clipped(clip: Tensor, faces: Tensor, height: int, width: int) -> Tensor:
    """Screen segments ``[S, 2, 2]`` of one view's silhouette edges when some vertices lie before the near
    plane: facing from the homogeneous determinant det[x y w] (the eye's side of each face's plane,
    defined even for faces that cross the eye plane), edges cut at the near plane, hidden ones dropped."""
    edges, adjacent = edge_faces(faces)
    corners = clip.detach()[faces][..., [0, 1, 3]]  # [F, 3, 3]
    facing = torch.linalg.det(corners) > 0
    boundary = adjacent[:, 1] < 0
    flips = facing[adjacent[:, 0]] != facing[adjacent[:, 1].clamp_min(0)]
    edges = edges[boundary | flips]
    distance = clip[:, 2] + clip[:, 3]
    d = distance[edges]  # [S, 2]
    edges, d = edges[(d >= 0).any(-1)], d[(d >= 0).any(-1)]
    a, b = clip[edges[:, 0]], clip[edges[:, 1]]
    t = (d[:, 0] / (d[:, 0] - d[:, 1])).clamp(0, 1)[:, None]  # only used where the signs differ
    at_near = a + t * (b - a)
    a = torch.where((d[:, 0] < 0)[:, None], at_near, a)
    b = torch.where((d[:, 1] < 0)[:, None], at_near, b)
    return to_screen(torch.stack([a, b], dim=1), height, width)[..., :2]


def _segment_distance(points: Tensor, a: Tensor, b: Tensor) -> Tensor:
    ab = b - a
    t = ((points - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
    closest = a + t.clamp(0, 1)[..., None] * ab
    return (points - closest).norm(dim=-1)


def silhouette_coverage(rast: Rasterization) -> tuple[Tensor, Tensor]:
    """Coverage ``[B, H, W]`` (hard mask, with ``clamp(0.5 ± d, 0, 1)`` on the outline) and the outline mask.

    ``d`` is the distance from the pixel centre to the nearest silhouette edge; it carries the
    gradient w.r.t. the vertices that move the outline.
    """
    mask = rast.mask
    height, width = mask.shape[1:]
    outline = torch.zeros_like(mask)
    for dy, dx in _NEIGHBOURS:
        outline |= _shift(mask, dy, dx, False) != mask
    coverage = mask.to(rast.clip.dtype).clone()
    if rast.clip.shape[-1] == 4:
        screen = to_screen(rast.clip, height, width)
    else:
        screen = rast.clip
    for b in range(mask.shape[0]):
        pixels = torch.nonzero(outline[b])
        if pixels.numel() == 0:
            continue
        if rast.clip.shape[-1] == 4 and bool((rast.clip[b, :, 2] + rast.clip[b, :, 3] < 0).any()):
            ends = _silhouette_segments_clipped(rast.clip[b], rast.faces, height, width)
        else:
            ends = screen[b][_silhouette_edges(screen[b], rast.faces)][..., :2]  # [S, 2, 2]
        if ends.numel() == 0:
            continue
        centres = pixels.flip(-1).to(screen.dtype) + 0.5
        with torch.no_grad():
            nearest = torch.cat(
                [
                    _segment_distance(
                        chunk[:, None], ends[None, :, 0].detach(), ends[None, :, 1].detach()
                    ).argmin(1)
                    for chunk in centres.split(1024)
                ]
            )
        distance = _segment_distance(centres, ends[nearest, 0], ends[nearest, 1])
        sign = torch.where(mask[b][pixels[:, 0], pixels[:, 1]], 1.0, -1.0).to(distance)
        value = (0.5 + sign * distance).clamp(0, 1)
        coverage = coverage.index_put((torch.full_like(pixels[:, 0], b), pixels[:, 0], pixels[:, 1]), value)
    return coverage, outline


def antialias(foreground: Tensor, background: Tensor, rast: Rasterization) -> tuple[Tensor, Tensor]:
    """Composite ``foreground [B,H,W,C]`` (valid where covered) over ``background`` with silhouette coverage.

    On the outline a background pixel borrows the colour of a covered 4-neighbour, so the blend has
    both colours; covered outline pixels blend with their own background. Returns (colour, alpha).
    """
    background = background.expand_as(foreground)
    coverage, outline = silhouette_coverage(rast)
    mask = rast.mask
    borrowed = foreground
    found = mask
    for dy, dx in _NEIGHBOURS:
        take = ~found & _shift(mask, dy, dx, False)
        borrowed = torch.where(take[..., None], _shift(foreground, dy, dx, 0.0), borrowed)
        found = found | take
    alpha = coverage[..., None]
    blended = alpha * borrowed + (1 - alpha) * background
    hard = torch.where(mask[..., None], foreground, background)
    return torch.where(outline[..., None], blended, hard), alpha


@dataclass
class MeshRender:
    """Images ``[B, H, W, C]`` of a mesh: antialiased ``rgb`` over the background, ``alpha``, world
    ``position`` and shading ``normal`` (interpolated vertex normals, zero on background)."""

    rgb: Tensor
    alpha: Tensor
    position: Tensor
    normal: Tensor
    rast: Rasterization


def render_mesh(
    mesh: TriangleMesh,
    cameras: Cameras,
    vertex_colors: Tensor | None = None,
    shade: Any = None,
    background: Tensor | None = None,
    backend: MeshBackend = "torch",
    near: float = 0.01,
    far: float = 100.0,
) -> MeshRender:
    """Render ``mesh`` into every camera.

    Colour is ``shade(position, normal) -> [B,H,W,3]`` when given (a texture network queried at the
    surface points, a material), else the interpolated ``vertex_colors [V, 3]``, else the normal
    mapped to [0, 1]. ``background`` is ``[3]`` or ``[B,H,W,3]`` (default black).
    """
    cams = cameras.to(mesh.vertices.device)
    mvp = cams.mvp(near, far).to(mesh.vertices.dtype)
    homogeneous = torch.cat([mesh.vertices, torch.ones_like(mesh.vertices[:, :1])], dim=-1)
    clip = torch.einsum("bij,vj->bvi", mvp, homogeneous)
    rast = rasterize(clip, mesh.faces, cams.height, cams.width, backend)
    position = interpolate(mesh.vertices, rast)
    normal = torch.nn.functional.normalize(interpolate(mesh.vertex_normals(), rast), dim=-1)
    if shade is not None:
        color = shade(position, normal)
    elif vertex_colors is not None:
        color = interpolate(vertex_colors, rast)
    else:
        color = 0.5 * (normal + 1)
    if background is None:
        background = torch.zeros(3, dtype=color.dtype, device=color.device)
    if rast.native is not None:
        rgb, alpha = _antialias_nvdiffrast(color, background, rast)
    else:
        rgb, alpha = antialias(color, background.to(color), rast)
    return MeshRender(rgb=rgb, alpha=alpha, position=position, normal=normal, rast=rast)


def _rasterize_nvdiffrast(clip: Tensor, faces: Tensor, height: int, width: int) -> Rasterization:
    import nvdiffrast.torch as dr

    key = str(clip.device)
    if key not in _gl_contexts:
        _gl_contexts[key] = dr.RasterizeCudaContext(device=clip.device)
    raw, _ = dr.rasterize(
        _gl_contexts[key], clip.float().contiguous(), faces.int().contiguous(), (height, width)
    )
    rast = raw.flip(1)  # nvdiffrast stores the bottom row (NDC y = −1) first
    face_id = rast[..., 3].long() - 1
    u, v = rast[..., 0], rast[..., 1]
    bary = torch.stack([u, v, 1 - u - v], dim=-1) * (face_id >= 0)[..., None]
    return Rasterization(face_id=face_id, bary=bary, clip=clip, faces=faces, native=raw)


def _antialias_nvdiffrast(color: Tensor, background: Tensor, rast: Rasterization) -> tuple[Tensor, Tensor]:
    import nvdiffrast.torch as dr

    alpha = rast.mask[..., None].to(color.dtype)
    hard = alpha * color + (1 - alpha) * background.expand_as(color)
    both = torch.cat([hard, alpha], dim=-1).flip(1).contiguous()
    smooth = dr.antialias(
        both, rast.native, rast.clip.float().contiguous(), rast.faces.int().contiguous()
    ).flip(1)
    return smooth[..., :-1], smooth[..., -1:]
