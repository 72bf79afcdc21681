"""One reference image at a known camera plus random novel-view cameras: the data of Zero-1-to-3.

Every training batch holds both: the random cameras of step s (drawn exactly like
``RandomCameraDataset``, from ``(seed, s)``) and the reference view with its RGB and mask resized to
the reference resolution of step s. Defaults follow threestudio's ``zero123.yaml``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from recipes.data.cameras import Cameras, cameras_from_spherical, orbit_cameras
from recipes.data.random_cameras import (
    RandomCameraConfig,
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

    def to(self, device: torch.device | str) -> ReferenceViewBatch:
        return replace(
            self,
            random=self.random.to(device),
            reference=self.reference.to(device),
            rgb=self.rgb.to(device),
            mask=self.mask.to(device),
        )


def load_rgba(path: str) -> Tensor:
    """An RGBA image file as a float tensor ``[H, W, 4]`` in [0, 1] (opaque alpha added if missing)."""
    import imageio.v3 as iio

    array = np.asarray(iio.imread(path))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    image = torch.from_numpy(array.astype(np.float32) / scale)
    if image.shape[-1] == 3:
        image = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    return image


def resize_rgba(rgba: Tensor, height: int, width: int) -> Tensor:
    """Area-resample an ``[H, W, 4]`` image to ``[height, width, 4]``."""
    if rgba.shape[:2] == (height, width):
        return rgba
    chw = rgba.permute(2, 0, 1)[None]
    mode = "area" if height <= rgba.shape[0] else "bilinear"
    return torch.nn.functional.interpolate(chw, size=(height, width), mode=mode)[0].permute(1, 2, 0)


class SingleImageDataset(Dataset[ReferenceViewBatch]):
    """Item s: the random cameras of step s and the reference view at the resolution of step s."""

    def __init__(
        self,
        rgba: Tensor,
        reference: ReferenceViewConfig,
        cameras: RandomCameraConfig,
        seed: int,
        num_steps: int,
    ) -> None:
        self.rgba = rgba
        self.reference = reference
        self.cameras = cameras
        self.seed = seed
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def reference_cameras(self, height: int, width: int) -> Cameras:
        """The reference camera (light at the camera) at the given resolution."""
        ref = self.reference
        return cameras_from_spherical(
            torch.tensor([ref.elevation_deg]),
            torch.tensor([ref.azimuth_deg]),
            torch.tensor([ref.camera_distance]),
            torch.tensor([ref.fovy_deg]),
            height,
            width,
        )

    def __getitem__(self, step: int) -> ReferenceViewBatch:
        if not 0 <= step < self.num_steps:
            raise IndexError(step)
        height, width = self.reference.resolution_at(step)
        image = resize_rgba(self.rgba, height, width)[None]
        return ReferenceViewBatch(
            random=sample_random_cameras(self.cameras, step, step_generator(self.seed, step)),
            reference=self.reference_cameras(height, width),
            rgb=image[..., :3],
            mask=image[..., 3:],
        )


class SingleImageDataModule(pl.LightningDataModule):
    """Zero-1-to-3 data: an RGBA image file (alpha = object mask) seen from the reference camera.

    Validation/test orbit the object at the reference elevation, distance and field of view, starting
    at the reference azimuth. ``num_steps`` must be at least ``trainer.max_steps``.
    """

    def __init__(
        self,
        image_path: str,
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
        self.image_path = image_path
        self.reference = reference if reference is not None else ReferenceViewConfig()
        self.cameras = cameras if cameras is not None else zero123_random_cameras()
        self.seed = seed
        self.num_steps = num_steps
        self.eval_height = eval_height
        self.eval_width = eval_width
        self.n_val_views = n_val_views
        self.n_test_views = n_test_views

    def train_dataset(self) -> SingleImageDataset:
        rgba = load_rgba(self.image_path)
        return SingleImageDataset(rgba, self.reference, self.cameras, self.seed, self.num_steps)

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
        return step_indexed_loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_val_views)))

    def test_dataloader(self) -> DataLoader:
        return step_indexed_loader(TurntableDataset(self._turntable(self.n_test_views)))
