"""K closed-form priors in one denoiser: object k's view-conditioned prior when asked for object k.

The references of all K objects (each seen from the same grid of reference cameras) form one
:class:`~recipes.guidance.closed_form.ClosedFormPrior`. An :class:`ObjectViews` condition keeps only the references
of the asked object (the others get logit −∞) and applies the camera kernel: that is exactly object k's own
prior, the posterior mean of a diffusion model trained on its views. The unconditional prediction (condition
``None``) is the mixture over every reference of every object with no camera term: the model with the prompt
dropped, p(x) = Σ_k p(x | k) / K. So classifier-free guidance, ASD's and CSD's ε(x_t, y) − ε(x_t, ∅) mean what
they mean on a text model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.data.procedural import ProceduralObject, reference_cameras
from recipes.guidance.closed_form import ClosedFormPrior, view_directions


@dataclass
class ObjectViews:
    """The condition "object ``objects[b]`` seen from camera ``b``".

    Attributes:
        objects: object index per batch element ``[B]`` (int64).
        cameras: the views (anything :func:`~recipes.guidance.closed_form.view_directions` reads).
    """

    objects: Tensor
    cameras: Any


class MultiObjectPrior(ClosedFormPrior):
    """The closed-form priors of several objects, selected by :class:`ObjectViews` conditions.

    Args:
        references: ``[K·N, C, H, W]`` in [−1, 1], object-major (object k's views are rows ``k·N … k·N + N − 1``).
        reference_directions: ``[K·N, 3]``, as for :class:`ClosedFormPrior`.
        num_objects: K.
        **kwargs: ``sigma_deg``, ``restrict_deg``, ``num_train_timesteps`` of :class:`ClosedFormPrior`.
    """

    object_index: Tensor

    def __init__(
        self, references: Tensor, reference_directions: Tensor, num_objects: int, **kwargs: Any
    ) -> None:
        super().__init__(references, reference_directions, **kwargs)
        if references.shape[0] % num_objects:
            raise ValueError(f"{references.shape[0]} references cannot be split over {num_objects} objects")
        per_object = references.shape[0] // num_objects
        self.num_objects = num_objects
        self.register_buffer(
            "object_index", torch.arange(num_objects).repeat_interleave(per_object), persistent=False
        )

    @classmethod
    def from_objects(
        cls,
        objects: list[ProceduralObject],
        height: int = 32,
        sigma_deg: float | None = 10.0,
        restrict_deg: float | None = None,
    ) -> MultiObjectPrior:
        """The priors of ``objects``, each from the 36 reference views of ``reference_cameras``."""
        cameras = reference_cameras(height=height, width=height)
        images = torch.cat([obj.render(cameras).rgb * 2.0 - 1.0 for obj in objects])
        directions = view_directions(cameras).repeat(len(objects), 1)
        return cls(images, directions, len(objects), sigma_deg=sigma_deg, restrict_deg=restrict_deg)

    def view_logits(self, condition: Any, batch_size: int) -> Tensor | None:
        if not isinstance(condition, ObjectViews):
            return super().view_logits(condition, batch_size)
        objects = condition.objects.to(self.object_index.device).reshape(-1, 1)
        if objects.shape[0] not in (1, batch_size):
            raise ValueError(f"condition names {objects.shape[0]} objects for a batch of {batch_size}")
        view = super().view_logits(condition.cameras, batch_size)
        logits = torch.zeros(batch_size, self.num_references, device=self.object_index.device)
        if view is not None:
            logits = logits + view
        return logits.masked_fill(self.object_index[None, :] != objects, -math.inf)


def object_views(objects: Tensor, cameras: Cameras) -> ObjectViews:
    """The condition of objects ``[B]`` seen from ``cameras`` (B views)."""
    return ObjectViews(objects.long(), cameras)


__all__ = ["MultiObjectPrior", "ObjectViews", "object_views"]
