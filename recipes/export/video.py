"""Turntable videos and image grids (imageio with its bundled ffmpeg; no system ffmpeg needed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recipes.data.cameras import Cameras, orbit_cameras


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (any leading shape, channels last) to uint8; uint8 passes through."""
    array = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images)
    if array.dtype == np.uint8:
        return array
    return (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def image_grid(
    images: Tensor | np.ndarray | Sequence, columns: int | None = None, padding: int = 2, fill: int = 255
) -> np.ndarray:
    """Tile ``N`` images ``[H, W, C]`` into one uint8 image, ``columns`` per row (default ≈ √N)."""
    tiles = to_uint8(np.stack([to_uint8(i) for i in images]))
    n, h, w, c = tiles.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full(
        (rows * h + (rows + 1) * padding, columns * w + (columns + 1) * padding, c), fill, np.uint8
    )
    for i, tile in enumerate(tiles):
        y = padding + (i // columns) * (h + padding)
        x = padding + (i % columns) * (w + padding)
        grid[y : y + h, x : x + w] = tile
    return grid


def save_image(path: str | Path, image: Tensor | np.ndarray) -> Path:
    """Write one ``[H, W, C]`` image (png/jpg by suffix)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, to_uint8(image))
    return path


def write_video(path: str | Path, frames: Tensor | np.ndarray | Sequence, fps: int = 30) -> Path:
    """Write ``frames [N, H, W, 3]`` as ``.mp4`` (H.264, sides padded to even sizes) or ``.gif``."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = to_uint8(np.stack([to_uint8(f) for f in frames]))
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        imageio.mimwrite(path, list(video), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    elif suffix == ".gif":
        imageio.mimwrite(path, list(video), duration=1000 / fps, loop=0)
    else:
        raise ValueError(f"unsupported video format {path.suffix!r}; use .mp4 or .gif")
    return path


@torch.no_grad()
def render_turntable(
    render: Callable[[Cameras], Tensor],
    n_views: int = 120,
    elevation_deg: float = 15.0,
    distance: float = 1.5,
    fovy_deg: float = 70.0,
    height: int = 512,
    width: int = 512,
    batch_size: int = 8,
) -> np.ndarray:
    """``n_views`` frames ``[N, H, W, 3]`` (uint8) orbiting the object; ``render(cameras) -> [B, H, W, 3]``.

    Defaults are threestudio's test views (120 azimuths at elevation 15°, distance 1.5, fovy 70°).
    """
    cameras = orbit_cameras(n_views, elevation_deg, distance, fovy_deg, height, width)
    frames = [to_uint8(render(cameras[i : i + batch_size])) for i in range(0, n_views, batch_size)]
    return np.concatenate(frames)


def save_turntable(
    stem: str | Path,
    render: Callable[[Cameras], Tensor],
    fps: int = 30,
    formats: Sequence[str] = (".mp4", ".gif"),
    **views,
) -> list[Path]:
    """Render a turntable (:func:`render_turntable` ``**views``) and write it as ``stem`` + each format."""
    frames = render_turntable(render, **views)
    return [write_video(Path(stem).with_suffix(fmt), frames, fps) for fmt in formats]
