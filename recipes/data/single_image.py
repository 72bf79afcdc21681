"""One reference image at a known camera plus random novel-view cameras: the data of Zero-1-to-3.

Every training batch holds both: the random cameras of step s (drawn exactly like
``RandomCameraDataset``, from ``(seed, s)``) and the reference view with its RGB, mask (and depth, when
known) resized to the reference resolution of step s. Defaults follow threestudio's ``zero123.yaml``.

The input image is an RGBA file (alpha = object mask), an RGB file with its background colour given (the
mask is every pixel that differs from it), or ``"procedural"``: the procedural object
(``recipes.data.procedural``) rendered at the reference camera, with its exact mask and depth, so that a
weight-free run needs no file.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from recipes.data.cameras import Cameras, cameras_from_spherical, orbit_cameras
from recipes.data.random_cameras import (
    RandomCameraConfig,
    ResumableStepLoader,
    TurntableDataset,
    sample_random_cameras,
    step_generator,
    step_indexed_loader,
)


def zero123_random_cameras() -> RandomCameraConfig:
    """threestudio's zero123.yaml novel-view cameras (fixed fovy 20°, distance 3.8, progressive resolution)."""
    return RandomCameraConfig(
        height=[64, 128, 256],
        width=[64, 128, 256],
        batch_size=[12, 4, 2],
        resolution_milestones=[200, 300],
        elevation_range=(-10.0, 80.0),
        azimuth_range=(-180.0, 180.0),
        camera_distance_range=(3.8, 3.8),
        fovy_range=(20.0, 20.0),
        camera_perturb=0.0,
        center_perturb=0.0,
        up_perturb=0.0,
        eval_elevation_deg=5.0,
        eval_camera_distance=3.8,
        eval_fovy_deg=20.0,
    )


@dataclass
class ReferenceViewConfig:
    """The reference camera and its image resolution schedule (list items start at the milestones)."""

    elevation_deg: float = 5.0
    azimuth_deg: float = 0.0
    camera_distance: float = 3.8
    fovy_deg: float = 20.0
    height: int | list[int] = field(default_factory=lambda: [128, 256, 512])
    width: int | list[int] = field(default_factory=lambda: [128, 256, 512])
    resolution_milestones: list[int] = field(default_factory=lambda: [200, 300])

    def resolution_at(self, step: int) -> tuple[int, int]:
        """Reference image ``(height, width)`` at ``step``."""
        phase = bisect.bisect_right(self.resolution_milestones, step)
        height = self.height if isinstance(self.height, int) else self.height[phase]
        width = self.width if isinstance(self.width, int) else self.width[phase]
        return height, width


@dataclass
class ReferenceViewBatch:
    """A Zero-1-to-3 training batch: novel-view cameras and the reference view with its pixels."""

    random: Cameras
    reference: Cameras
    rgb: Tensor  # [1, H, W, 3] in [0, 1]
    mask: Tensor  # [1, H, W, 1] in [0, 1]
    depth: Tensor | None = None  # [1, H, W, 1], mask-weighted distance along the ray, when known

    def to(self, device: torch.device | str) -> ReferenceViewBatch:
        return replace(
            self,
            random=self.random.to(device),
            reference=self.reference.to(device),
            rgb=self.rgb.to(device),
            mask=self.mask.to(device),
            depth=None if self.depth is None else self.depth.to(device),
        )


PROCEDURAL_IMAGE = "procedural"
"""``SingleImageDataModule(image=...)`` value that renders the procedural object at the reference camera."""


def _read_image(path: str) -> Tensor:
    import imageio.v3 as iio

    array = np.asarray(iio.imread(path))
    if array.ndim == 2:
        array = array[..., None]
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    return torch.from_numpy(array.astype(np.float32) / scale)


def load_rgba(
    path: str, background_color: tuple[float, float, float] | None = None, tolerance: float = 0.02
) -> Tensor:
    """An image file as a float tensor ``[H, W, 4]`` in [0, 1], alpha being the object mask.

    An RGBA file keeps its alpha. An RGB (or grey) file needs ``background_color``: the mask is every pixel
    that differs from that colour by more than ``tolerance`` in some channel. Raises ``FileNotFoundError``
    for a missing file and ``ValueError`` for an RGB file without a background colour.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"input image {path} does not exist; pass --data.image path/to/image.png (RGBA), or "
            f"--data.image {PROCEDURAL_IMAGE} for a view of the procedural object"
        )
    image = _read_image(path)
    if image.shape[-1] in (2, 4):  # grey + alpha, RGB + alpha
        return torch.cat([image[..., :-1].expand(*image.shape[:2], 3), image[..., -1:]], dim=-1)
    rgb = image.expand(*image.shape[:2], 3)
    if background_color is None:
        raise ValueError(
            f"{path} has no alpha channel and background removal is left to you: pass an RGBA image (e.g. cut "
            "out with rembg), or give the uniform background colour, e.g. --data.background_color [1,1,1]"
        )
    background = torch.tensor(background_color, dtype=rgb.dtype)
    mask = ((rgb - background).abs().amax(dim=-1, keepdim=True) > tolerance).to(rgb.dtype)
    return torch.cat([rgb, mask], dim=-1)


def load_depth(path: str) -> Tensor:
    """A depth map file (any scale: the depth loss is invariant to scale and shift) as ``[H, W, 1]``."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"depth map {path} does not exist; pass --data.depth path/to/depth.png or omit it"
        )
    return _read_image(path)[..., :1]


def resize_rgba(rgba: Tensor, height: int, width: int) -> Tensor:
    """Area-resample an ``[H, W, 4]`` image to ``[height, width, 4]``."""
    if rgba.shape[:2] == (height, width):
        return rgba
    chw = rgba.permute(2, 0, 1)[None]
    mode = "area" if height <= rgba.shape[0] else "bilinear"
    return torch.nn.functional.interpolate(chw, size=(height, width), mode=mode)[0].permute(1, 2, 0)


class SingleImageDataset(Dataset[ReferenceViewBatch]):
    """Item s: the random cameras of step s and the reference view at the resolution of step s.

    ``pixels`` is ``[H, W, 4]`` (RGB, mask) or ``[H, W, 5]`` (RGB, mask, depth).
    """

    def __init__(
        self,
        pixels: Tensor,
        reference: ReferenceViewConfig,
        cameras: RandomCameraConfig,
        seed: int,
        num_steps: int,
    ) -> None:
        self.pixels = pixels
        self.reference = reference
        self.cameras = cameras
        self.seed = seed
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def reference_cameras(self, height: int, width: int) -> Cameras:
        """The reference camera (light at the camera) at the given resolution."""
        return reference_camera(self.reference, height, width)

    def __getitem__(self, step: int) -> ReferenceViewBatch:
        if not 0 <= step < self.num_steps:
            raise IndexError(step)
        height, width = self.reference.resolution_at(step)
        image = resize_rgba(self.pixels, height, width)[None]
        return ReferenceViewBatch(
            random=sample_random_cameras(self.cameras, step, step_generator(self.seed, step)),
            reference=self.reference_cameras(height, width),
            rgb=image[..., :3],
            mask=image[..., 3:4],
            depth=image[..., 4:5] if image.shape[-1] > 4 else None,
        )


def reference_camera(reference: ReferenceViewConfig, height: int, width: int) -> Cameras:
    """The reference view's camera (light at the camera) at ``height × width``."""
    return cameras_from_spherical(
        torch.tensor([reference.elevation_deg]),
        torch.tensor([reference.azimuth_deg]),
        torch.tensor([reference.camera_distance]),
        torch.tensor([reference.fovy_deg]),
        height,
        width,
    )


def procedural_view(reference: ReferenceViewConfig) -> Tensor:
    """The procedural object seen from the reference camera at its largest resolution: ``[H, W, 5]``
    (RGB on white, mask, depth)."""
    from recipes.data.procedural import default_procedural_object

    heights = [reference.height] if isinstance(reference.height, int) else reference.height
    widths = [reference.width] if isinstance(reference.width, int) else reference.width
    view = default_procedural_object().render(reference_camera(reference, max(heights), max(widths)))
    # The render is composited on white; RGBA images hold the colour before compositing.
    alpha = view.alpha
    straight = torch.where(
        alpha > 0, (view.rgb - (1.0 - alpha)) / alpha.clamp_min(1e-6), torch.ones_like(view.rgb)
    )
    return torch.cat([straight.clamp(0.0, 1.0), alpha, view.depth], dim=1)[0].permute(1, 2, 0)


@dataclass
class ReferenceImage:
    """The input view at full resolution: ``rgba [H, W, 4]`` and its camera (``cameras``, one view)."""

    rgba: Tensor
    cameras: Cameras

    def on_white(self) -> Tensor:
        """The image composited on white, ``[1, 3, H, W]``: what Zero-1-to-3 was trained to take."""
        rgb, alpha = self.rgba[..., :3], self.rgba[..., 3:]
        return (rgb * alpha + (1.0 - alpha)).permute(2, 0, 1)[None]


class SingleImageDataModule(pl.LightningDataModule):
    """Zero-1-to-3 data: one input image seen from the reference camera, and random novel-view cameras.

    Validation/test orbit the object at the reference elevation, distance and field of view, starting
    at the reference azimuth. ``num_steps`` must be at least ``trainer.max_steps``. The image is read (and
    checked) on first use; the recipe system reads it before a run writes anything.

    Args:
        image: an RGBA image file (alpha = object mask), an RGB file with ``background_color``, or
            ``"procedural"`` (the procedural object at the reference camera, with its depth).
        background_color: the uniform background of an RGB image, RGB in [0, 1]; pixels within
            ``background_tolerance`` of it are background. Default is None (the image must have alpha).
        background_tolerance: per-channel tolerance of the background colour. Default is 0.02.
        depth: a depth map of the input view (any scale and shift) for the depth loss. Default is None
            (no depth, except for ``"procedural"``, whose depth is exact).
        reference: the reference camera and its resolution schedule. Default is threestudio's zero123.yaml.
        cameras: the random novel-view cameras. Default is threestudio's zero123.yaml.
        seed: base of the cameras' per-step seeds. Default is 0.
        num_steps: number of training batches. Default is 600.
        eval_height, eval_width: validation/test render size. Default is 256.
        n_val_views, n_test_views: views of the validation and test orbits. Default is 1 and 120.
    """

    def __init__(
        self,
        image: str,
        background_color: tuple[float, float, float] | None = None,
        background_tolerance: float = 0.02,
        depth: str | None = None,
        reference: ReferenceViewConfig | None = None,
        cameras: RandomCameraConfig | None = None,
        seed: int = 0,
        num_steps: int = 600,
        eval_height: int = 256,
        eval_width: int = 256,
        n_val_views: int = 1,
        n_test_views: int = 120,
    ) -> None:
        super().__init__()
        self.image = image
        self.reference = reference if reference is not None else ReferenceViewConfig()
        self.cameras = cameras if cameras is not None else zero123_random_cameras()
        self.seed = seed
        self.num_steps = num_steps
        self.eval_height = eval_height
        self.eval_width = eval_width
        self.n_val_views = n_val_views
        self.n_test_views = n_test_views
        self.background_color = background_color
        self.background_tolerance = background_tolerance
        self.depth = depth
        self._pixels: Tensor | None = None

    @property
    def pixels(self) -> Tensor:
        """The input view ``[H, W, 4]`` (RGB, mask) or ``[H, W, 5]`` (and depth), read on first use.

        Raises ``FileNotFoundError`` or ``ValueError`` (one line, saying what to pass) for a bad input.
        """
        if self._pixels is None:
            if self.image == PROCEDURAL_IMAGE:
                self._pixels = procedural_view(self.reference)
            else:
                pixels = load_rgba(self.image, self.background_color, self.background_tolerance)
                if self.depth is not None:
                    pixels = torch.cat(
                        [pixels, resize_rgba(load_depth(self.depth), *pixels.shape[:2])], dim=-1
                    )
                self._pixels = pixels
        return self._pixels

    @property
    def config(self) -> RandomCameraConfig:
        """The novel-view cameras (the name the system reads resolutions from)."""
        return self.cameras

    def reference_image(self) -> ReferenceImage:
        """The input view at full resolution with its camera."""
        height, width = self.pixels.shape[:2]
        return ReferenceImage(self.pixels[..., :4], reference_camera(self.reference, height, width))

    def train_dataset(self) -> SingleImageDataset:
        return SingleImageDataset(self.pixels, self.reference, self.cameras, self.seed, self.num_steps)

    def _turntable(self, n: int) -> Cameras:
        cams = orbit_cameras(
            n,
            elevation_deg=self.reference.elevation_deg,
            distance=self.reference.camera_distance,
            fovy_deg=self.reference.fovy_deg,
            height=self.eval_height,
            width=self.eval_width,
        )
        azimuth = cams.azimuth_deg + self.reference.azimuth_deg
        return cameras_from_spherical(
            cams.elevation_deg,
            azimuth,
            cams.distance,
            torch.rad2deg(cams.fovy),
            self.eval_height,
            self.eval_width,
        )

    def train_dataloader(self) -> DataLoader:
        return ResumableStepLoader(self.train_dataset(), self)

    def val_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_val_views)))

    def test_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_test_views)))
