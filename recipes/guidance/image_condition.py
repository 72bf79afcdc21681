"""Zero-1-to-3's conditioning, an input view plus the camera's offset from it, for any image-conditioned model.

A novel view is asked for by its camera *relative* to the input view: Δelevation, Δazimuth and Δdistance
(threestudio's ``zero123-guidance``). :class:`ImageCondition` holds the encoded input view and its camera and
turns a batch of cameras into the model's condition. Two encoders implement it:

- :class:`~recipes.guidance.zero123.Zero123Denoiser` (CLIP embedding and VAE latent of the input view);
- :class:`ClosedFormImageEncoder`, the weight-free setting: the closed-form prior of the procedural object
  conditioned the same way. The input view is located among the prior's posed references (the nearest one in
  pixel space, the exact posterior at t = 0 of which reference was seen), and a novel view is asked for at
  that pose plus the deltas. So the prior never reads the absolute training cameras: it sees the input image
  and relative cameras only, as Zero-1-to-3 does. It is exact when the input view is one of its references
  (the reference camera on the prior's grid of elevations −10°/20°/50° and azimuths 0°, 30°, …, at distance 3
  with a 40° field of view, like ``--data.image procedural`` at such a camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.guidance.closed_form import ClosedFormPrior


class ImageConditionEncoder(Protocol):
    """What :class:`ImageCondition` needs of a model: encode the input view once, then condition on deltas."""

    def encode_reference(self, rgb: Tensor) -> Any: ...

    def condition(
        self,
        reference: Any,
        delta_elevation_deg: Tensor,
        delta_azimuth_deg: Tensor,
        delta_radius: Tensor | None = None,
    ) -> Any: ...


@dataclass
class ImageCondition:
    """An encoded input view and its camera: :meth:`__call__` gives the condition of a camera batch.

    Attributes:
        encoder: the model's encoder (``Zero123Denoiser`` or :class:`ClosedFormImageEncoder`).
        reference: what ``encoder.encode_reference`` returned for the input view.
        elevation_deg, azimuth_deg, distance: the input view's camera.
    """

    encoder: ImageConditionEncoder
    reference: Any
    elevation_deg: float
    azimuth_deg: float
    distance: float

    @classmethod
    def encode(cls, encoder: ImageConditionEncoder, rgb: Tensor, cameras: Cameras) -> ImageCondition:
        """Encode the input view ``rgb [1, 3, H, W]`` in [0, 1] (on white) seen from ``cameras`` (one view)."""
        return cls(
            encoder,
            encoder.encode_reference(rgb),
            float(cameras.elevation_deg[0]),
            float(cameras.azimuth_deg[0]),
            float(cameras.distance[0]),
        )

    def __call__(self, cameras: Cameras) -> Any:
        return self.encoder.condition(
            self.reference,
            cameras.elevation_deg - self.elevation_deg,
            cameras.azimuth_deg - self.azimuth_deg,
            cameras.distance - self.distance,
        )


class ClosedFormImageEncoder:
    """The closed-form prior behind Zero-1-to-3's interface: input image and camera deltas → view condition.

    ``encode_reference`` returns the (elevation, azimuth) in degrees of the prior's reference nearest to the
    input view; ``condition`` returns that pose plus the deltas, ``[B, 2]``, which the prior reads as its
    view condition (``recipes.guidance.closed_form.view_directions``). The distance delta is ignored: the
    prior's references are all at one distance.
    """

    def __init__(self, prior: ClosedFormPrior) -> None:
        self.prior = prior

    @torch.no_grad()
    def encode_reference(self, rgb: Tensor) -> Tensor:
        height, width = self.prior.references.shape[-2:]
        image = F.interpolate(rgb.float(), (height, width), mode="area")
        image = image.to(self.prior.references.device) * 2.0 - 1.0
        distances = (self.prior.references - image).flatten(1).square().sum(dim=1)
        direction = self.prior.reference_directions[distances.argmin()]
        elevation = torch.rad2deg(torch.asin(direction[2].clamp(-1.0, 1.0)))
        azimuth = torch.rad2deg(torch.atan2(direction[1], direction[0]))
        return torch.stack([elevation, azimuth]).cpu()

    def condition(
        self,
        reference: Tensor,
        delta_elevation_deg: Tensor,
        delta_azimuth_deg: Tensor,
        delta_radius: Tensor | None = None,
    ) -> Tensor:
        deltas = torch.stack([delta_elevation_deg.float(), delta_azimuth_deg.float()], dim=-1)
        return reference.to(deltas.device) + deltas
