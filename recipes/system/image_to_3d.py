"""Image-to-3D (Zero-1-to-3): the shared system plus the input view.

Each step is threestudio's ``zero123-system`` step with both substeps summed: the reference camera is rendered
and matched to the input image (colour, mask and, when known, depth), and the step's random cameras are
distilled from guidance conditioned on the input image and each camera's offset from it (Zero-1-to-3, or the
closed-form prior conditioned the same way, ``recipes.guidance.image_condition``). The random-camera substep
is :meth:`TextTo3D.training_step` itself; this module adds only the reference view.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_picard import step_generator
from recipes.data.single_image import ReferenceViewBatch
from recipes.guidance.reference_view import reference_depth_loss, reference_view_losses
from recipes.guidance.schedules import ScalarSchedule, scalar_at
from recipes.losses.regularizers import regularization
from recipes.system.guidance import IMAGE_MODELS, GuidanceConfig
from recipes.system.module import GUIDANCE_STREAM, TextTo3D
from recipes.system.scene import Scene

REFERENCE_STREAM = GUIDANCE_STREAM + 1  # the reference render's random choices (shading, ray offsets)


@dataclass
class ReferenceLossWeights:
    """Weights of the reference-view losses: numbers or schedules ``[start_step, start_value, end_value, end_step]``.

    They are relative to the distillation loss (weight 1). threestudio's zero123.yaml (λ_sds 0.1, rgb 500,
    mask 50) is rgb 5000, mask 500 here; DreamGaussian's image-to-3D is rgb 10000·s/T and mask 1000·s/T
    (``[0, 0, 10000, T]``).

    Attributes:
        rgb: MSE of the render to the input colour (composited on the render's background). Default is 5000.
        mask: MSE of the rendered opacity to the input mask. Default is 500.
        depth: scale- and shift-invariant depth MSE inside the mask; needs a depth map (``data.depth``, or the
            procedural image's own). Default is 0.
    """

    rgb: ScalarSchedule = 5000.0
    mask: ScalarSchedule = 500.0
    depth: ScalarSchedule = 0.0

    def at(self, step: int) -> dict[str, float]:
        """Each weight's value at ``step``."""
        return {f.name: scalar_at(getattr(self, f.name), step) for f in fields(self)}


class ImageTo3D(TextTo3D):
    """Reconstruct a 3D scene from one input view: reference-view losses plus image-conditioned distillation.

    Trains on :class:`~recipes.data.single_image.SingleImageDataModule` batches. Outputs, checkpoints, the
    Picard hooks and every other argument are :class:`~recipes.system.TextTo3D`'s.

    Args:
        scene: the representation (``recipes.system.NeRFScene`` or ``GaussianScene``).
        guidance: ``model: zero123`` (a hub id or local folder in the ``ashawkey/zero123-xl-diffusers``
            layout) or ``model: closed-form`` (weight-free). Default is Zero-1-to-3 XL.
        reference_losses: weights of the reference-view losses. Default is threestudio's zero123.yaml.
        prompt: names the run folder (no text conditions the guidance). Default is ``"the input image"``.
        recipe: the recipe's name. Default is ``"zero123"``.
        **kwargs: the other :class:`~recipes.system.TextTo3D` arguments (``sds``, ``regularizers``, ``seed``,
            ``mesh_resolution``, ``texture_size``).
    """

    def __init__(
        self,
        scene: Scene,
        guidance: GuidanceConfig | None = None,
        reference_losses: ReferenceLossWeights | None = None,
        prompt: str = "the input image",
        recipe: str = "zero123",
        **kwargs: Any,
    ) -> None:
        guidance = guidance if guidance is not None else GuidanceConfig(model="zero123")
        if guidance.model not in IMAGE_MODELS:
            raise ValueError(
                f"image-to-3D needs an image-conditioned guidance, not {guidance.model!r}; set "
                "model.guidance.model to 'zero123' or, weight-free, 'closed-form'"
            )
        super().__init__(scene=scene, prompt=prompt, recipe=recipe, guidance=guidance, **kwargs)
        self.reference_losses = reference_losses if reference_losses is not None else ReferenceLossWeights()

    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:
        """Also raise ``ValueError`` if the datamodule has no input view, or the scene cannot render its size."""
        if datamodule is not None and not hasattr(datamodule, "reference_image"):
            raise ValueError(
                f"image-to-3D trains on one input view, but the data is {type(datamodule).__name__}; use "
                "data.class_path recipes.data.single_image.SingleImageDataModule with --data.image IMAGE.png"
            )
        super().check_data(datamodule)
        if datamodule is not None:
            datamodule.reference_image()  # reads the image now: a bad one fails before the run writes anything
        reference = getattr(datamodule, "reference", None)
        if reference is not None:
            for step in [0, *reference.resolution_milestones]:
                self.scene.check_resolution(*reference.resolution_at(step))
        pixels = getattr(datamodule, "pixels", None)
        if pixels is not None and pixels.shape[-1] < 5 and _ever_nonzero(self.reference_losses.depth):
            raise ValueError(
                "the reference depth loss is on but the input view has no depth; pass --data.depth DEPTH.png, "
                "use --data.image procedural, or set model.reference_losses.depth to 0"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "reference_image"):
            raise ValueError(
                "image-to-3D reads its input view from the datamodule; fit with "
                "datamodule=recipes.data.single_image.SingleImageDataModule(image=...)"
            )
        view = datamodule.reference_image()
        self.guidance.condition_on_image(view.on_white().to(self.device), view.cameras.to(self.device))

    def training_step(self, batch: ReferenceViewBatch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch.random, batch_idx)  # prepares the step, renders the random views
        return loss + self.reference_view_loss(batch, self.global_step)

    def reference_view_loss(self, batch: ReferenceViewBatch, step: int) -> Tensor:
        """The weighted reference-view losses (and the regularizers on that render) of ``step``."""
        out = self.scene.render(batch.reference, generator=step_generator(offset=REFERENCE_STREAM))
        weights = self.reference_losses.at(step)
        mask = batch.mask.permute(0, 3, 1, 2)
        background = out.get("comp_rgb_bg")
        losses = reference_view_losses(
            out["comp_rgb"].permute(0, 3, 1, 2),
            out["opacity"].permute(0, 3, 1, 2),
            batch.rgb.permute(0, 3, 1, 2),
            mask,
            background=None if background is None else background.permute(0, 3, 1, 2),
        )
        terms = {"ref_rgb": (weights["rgb"], losses.rgb), "ref_mask": (weights["mask"], losses.mask)}
        if weights["depth"] != 0.0:
            depth = reference_depth_loss(
                out["depth"].permute(0, 3, 1, 2), batch.depth.permute(0, 3, 1, 2), mask
            )
            terms["ref_depth"] = (weights["depth"], depth)
        loss = out["comp_rgb"].new_zeros(())
        for name, (weight, value) in terms.items():
            self.log(f"train/loss_{name}", value.detach())
            loss = loss + weight * value
        return loss + sum(regularization(out, self.regularizers, step).values(), loss.new_zeros(()))


def _ever_nonzero(schedule: ScalarSchedule) -> bool:
    if isinstance(schedule, (int, float)):
        return schedule != 0.0
    values = [float(v) for v in schedule]
    return any(v != 0.0 for v in (values[-3:-1] if len(values) == 4 else values[:2]))
