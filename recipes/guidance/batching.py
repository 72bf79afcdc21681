"""Several steps' denoiser inputs in one call: concatenating conditions along the batch dimension.

``picard_training_step_slots`` (docs/picard-ready-module.md) evaluates several window slots at once: each slot
renders, encodes and noises its own batch from its own step seed, and the denoiser runs once over all of them.
The conditions the denoiser takes (text embeddings, cameras for the closed-form prior, Perp-Neg's sets of
embeddings) are concatenated here the way the slots' inputs are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recipes.data.cameras import Cameras
from recipes.guidance.cfg import PerpNegCondition


def concat_conditions(conditions: Sequence[Any]) -> Any:
    """One condition for the concatenated batch of ``conditions`` (one per step, in the inputs' order).

    Accepts ``None`` (unconditional: all must be), tensors ``[B, …]``, :class:`~recipes.data.cameras.Cameras` and
    :class:`~recipes.guidance.cfg.PerpNegCondition` with the same number of negatives.
    """
    if not conditions:
        raise ValueError("no conditions to concatenate")
    first = conditions[0]
    if any(type(c) is not type(first) for c in conditions):
        kinds = sorted({type(c).__name__ for c in conditions})
        raise TypeError(
            f"cannot batch conditions of different kinds {kinds}; every step must condition alike"
        )
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conditions))
    if isinstance(first, Cameras):
        return Cameras.cat(list(conditions))
    if isinstance(first, PerpNegCondition):
        counts = {len(c.negatives) for c in conditions}
        if len(counts) > 1:
            raise ValueError(f"cannot batch Perp-Neg conditions with {sorted(counts)} negatives")
        return PerpNegCondition(
            positive=concat_conditions([c.positive for c in conditions]),
            negatives=[concat_conditions([c.negatives[i] for c in conditions]) for i in range(counts.pop())],
            weights=torch.cat([c.weights for c in conditions]),
        )
    raise TypeError(
        f"cannot batch conditions of type {type(first).__name__}; set model.batched_slots false to evaluate the "
        "slots one by one"
    )
