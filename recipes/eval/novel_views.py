"""Novel-view quality of a generated object against the procedural ground truth, on held-out cameras."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.data.procedural import ProceduralObject, default_procedural_object, held_out_cameras
from recipes.eval.metrics import psnr, ssim


class NovelViewQuality(NamedTuple):
    """Mean PSNR (dB) and SSIM over the views, and the per-view values ``[V]``."""

    psnr: float
    ssim: float
    psnr_per_view: Tensor
    ssim_per_view: Tensor


@torch.no_grad()
def novel_view_quality(
    render: Callable[[Cameras], Tensor],
    cameras: Cameras | None = None,
    ground_truth: ProceduralObject | None = None,
) -> NovelViewQuality:
    """Compare ``render(cameras)`` (RGB ``[V, 3, H, W]`` in [0, 1], white background) with the ground truth.

    Defaults: the 8 held-out views of ``held_out_cameras()`` (32 × 32) and ``default_procedural_object()``.
    The mean PSNR is the mean of per-view PSNRs, as in the prototype measurements.
    """
    cameras = held_out_cameras() if cameras is None else cameras
    ground_truth = default_procedural_object() if ground_truth is None else ground_truth
    target = ground_truth.render(cameras).rgb
    prediction = render(cameras).to(target.device, torch.float32).clamp(0.0, 1.0)
    per_view_psnr = psnr(prediction, target)
    per_view_ssim = ssim(prediction, target)
    return NovelViewQuality(
        psnr=per_view_psnr.mean().item(),
        ssim=per_view_ssim.mean().item(),
        psnr_per_view=per_view_psnr,
        ssim_per_view=per_view_ssim,
    )


@torch.no_grad()
def silhouette_iou(
    render_alpha: Callable[[Cameras], Tensor],
    cameras: Cameras | None = None,
    ground_truth: ProceduralObject | None = None,
    threshold: float = 0.5,
) -> float:
    """Mean intersection over union of the rendered and the true silhouettes, a measure of the shape alone.

    ``render_alpha(cameras)`` is the coverage ``[V, 1, H, W]`` in [0, 1]; a pixel is inside where the coverage
    exceeds ``threshold`` (Default is 0.5). Cameras and ground truth as :func:`novel_view_quality`'s (Default is
    the 8 held-out 32 × 32 views and ``default_procedural_object()``). A view where both silhouettes are empty
    counts 1.
    """
    cameras = held_out_cameras() if cameras is None else cameras
    ground_truth = default_procedural_object() if ground_truth is None else ground_truth
    target = ground_truth.render(cameras).alpha > threshold
    prediction = render_alpha(cameras).to(target.device, torch.float32) > threshold
    if prediction.shape != target.shape:
        raise ValueError(
            f"render_alpha returned {tuple(prediction.shape)}, the ground truth is {tuple(target.shape)}; "
            "return the coverage as [V, 1, H, W] at the cameras' size"
        )
    intersection = (prediction & target).flatten(1).sum(1).float()
    union = (prediction | target).flatten(1).sum(1).float()
    per_view = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return per_view.mean().item()
