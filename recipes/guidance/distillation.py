"""What every score-distillation loss shares: the surrogate loss and its output record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillationOutput:
    """Result of one score-distillation evaluation.

    Attributes:
        loss: surrogate whose gradient w.r.t. the input ``x`` is ``grad / B``; its value
            (0.5·‖grad‖²/B) is not a meaningful objective, only its gradient is.
        grad: the distilled gradient w(t)·(ε̂ − ε_target), detached, same shape as ``x``.
        t: the timesteps used, shape ``[B]``.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    t: torch.Tensor


def finalize_gradient(grad: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """Replace NaN/inf by finite numbers and clamp element-wise to [−c, c] when ``grad_clip`` is set."""
    grad = torch.nan_to_num(grad)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad.detach()


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − (x − grad).detach()‖²/B, so that ∂loss/∂x = grad/B.

    This keeps Lightning's automatic optimization unchanged: ``training_step`` returns a scalar and
    ``backward`` carries the score-distillation gradient into the renderer.
    """
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="sum") / x.shape[0]
