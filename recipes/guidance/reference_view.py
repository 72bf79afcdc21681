"""Reference-view losses of image-to-3D (Zero-1-to-3 recipes): match the input view's colour and mask.

Weights belong to the recipe: threestudio's ``zero123.yaml`` uses rgb 500 and mask 50; DreamGaussian
uses 10000·r and 1000·r with r = step / total steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ReferenceViewLosses:
    """Mean squared errors on the reference view: colour (``rgb``) and silhouette (``mask``)."""

    rgb: torch.Tensor
    mask: torch.Tensor


def reference_view_losses(
    rgb: torch.Tensor,
    opacity: torch.Tensor,
    reference_rgb: torch.Tensor,
    reference_mask: torch.Tensor,
    background: torch.Tensor | None = None,
) -> ReferenceViewLosses:
    """Losses of a render of the reference camera against the input image.

    Args:
        rgb: rendered colour [B, 3, H, W] (composited on the render's background).
        opacity: rendered accumulated opacity [B, 1, H, W].
        reference_rgb: input image colour [B or 1, 3, H, W].
        reference_mask: input foreground mask in [0, 1], [B or 1, 1, H, W].
        background: the render's background [B, 3, H, W] or [3]; when given, the reference is
            composited on it so that the background is not penalised (threestudio's convention).
    """
    mask = reference_mask.float().expand_as(opacity)
    target = reference_rgb.float().expand_as(rgb)
    if background is not None:
        background = background.view(1, 3, 1, 1) if background.dim() == 1 else background
        target = target * mask + background.float() * (1.0 - mask)
    return ReferenceViewLosses(rgb=F.mse_loss(rgb.float(), target), mask=F.mse_loss(opacity.float(), mask))


def reference_depth_loss(
    depth: torch.Tensor, reference_depth: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scale- and shift-invariant depth loss on the reference view (threestudio's ``lambda_depth``).

    The input depth inside the mask is fitted to the rendered depth by least squares (a scale and a shift,
    without gradient), and the loss is the mean squared difference of the render to that fit: any depth map
    that is an affine function of the true one (a monocular estimate, a disparity-free render) works.

    Args:
        depth: rendered depth ``[B, 1, H, W]``.
        reference_depth: input depth ``[B or 1, 1, H, W]``.
        mask: input foreground mask ``[B or 1, 1, H, W]``; pixels above 0.5 count. With fewer than two such
            pixels the loss is 0.
    """
    valid = (mask > 0.5).expand_as(depth)
    rendered = depth.float()[valid]
    target = reference_depth.float().expand_as(depth)[valid]
    if rendered.numel() < 2:
        return depth.sum() * 0.0
    with torch.no_grad():
        centred = target - target.mean()
        scale = (centred * (rendered - rendered.mean())).sum() / centred.square().sum().clamp_min(1e-12)
        fitted = rendered.mean() + scale * centred
    return F.mse_loss(rendered, fitted)
