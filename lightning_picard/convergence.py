"""The convergence math of a Picard round: error norms, errors in step units, the slide and the aggregate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Aggregate = Literal["median", "mean"]
Initializer = Literal["copy", "extrapolate"]
ErrorUnits = Literal["step", "absolute"]
AGGREGATES: tuple[str, ...] = ("median", "mean")
INITIALIZERS: tuple[str, ...] = ("copy", "extrapolate")
ERROR_UNITS: tuple[str, ...] = ("step", "absolute")

SMALLEST_ERROR = torch.finfo(torch.float64).tiny
"""The error of a guess that differs from its replayed value at all: never 0, so that ``threshold=0`` is exact."""


def squared_norm(difference: torch.Tensor, exact_zero: bool = True) -> torch.Tensor:
    """‖difference‖² as a float64 scalar on the device, without a host sync and without a float64 copy.

    The sum runs in float32 (in place of the 8·D-byte float64 copy a float64 reduction needs). Squares of
    tiny differences can underflow to 0 there, so with ``exact_zero`` a non-zero difference whose norm underflows
    is reported as the smallest positive float64: an error is 0 exactly when the guess equals its replayed value,
    which keeps ``threshold=0`` exact. Only a zero threshold needs that test (a second pass over the values), so
    callers with a positive one pass ``exact_zero=False``. Default is ``True``.
    """
    if difference.numel() == 0:  # e.g. every Gaussian pruned
        return torch.zeros((), dtype=torch.float64, device=difference.device)
    accumulate = torch.float32 if difference.dtype in (torch.float16, torch.bfloat16) else None
    norm = torch.linalg.vector_norm(difference, dtype=accumulate).to(torch.float64).square()
    if not exact_zero:
        return norm
    low, high = torch.aminmax(difference)  # a nonzero test ~10x cheaper than .any() on CPU
    floor = ((low != 0) | (high != 0)).to(torch.float64) * SMALLEST_ERROR
    return torch.maximum(norm, floor)


def segment_squares(values: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """‖segment‖² of consecutive segments of ``values`` (lengths ``numels``), float64 ``[len(numels)]``."""
    segments = list(values.split(list(numels)))
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = (
        foreach_norm(segments)
        if foreach_norm is not None
        else [torch.linalg.vector_norm(v) for v in segments]
    )
    return torch.stack(list(norms)).to(torch.float64).square()


def step_relative_errors(
    errors: torch.Tensor, steps: torch.Tensor, weights: torch.Tensor, fallback: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors in units of the round's step length: the largest over tensors, and the step scale used.

    ``errors[j, k]`` is ‖θ′ − θ‖² of tensor k at slot j, ``steps[j, k]`` the ‖θ′_{τ+j+1} − θ′_{τ+j}‖² of the
    replayed step into that slot (NaN where a resize made it incomparable), ``weights[k]`` the tensor's weight
    (1 for a parameter, a buffer's weight, 0 to leave a tensor out). The scale of tensor k is its mean squared
    step over the round (``fallback`` where no step of the round was comparable); the error of slot j is the
    largest weighted ``errors[j, k] / scale[k]``: every tensor's guess is within the threshold of its own step.
    A tensor whose guess is off while it did not move makes the slot infinitely far; a NaN error stays NaN.
    """
    comparable = ~torch.isnan(steps)
    counted = comparable.sum(0)
    scale = torch.where(comparable, steps, torch.zeros_like(steps)).sum(0) / counted.clamp(min=1)
    missing = fallback if fallback is not None else torch.full_like(scale, math.nan)
    scale = torch.where(counted > 0, scale, missing)
    ratio = torch.where(errors == 0, torch.zeros_like(errors), errors / scale)  # 0/0: exact and did not move
    ratio = torch.where(weights > 0, ratio * weights, torch.zeros_like(ratio))
    return ratio.amax(dim=1), scale


def first_unconverged(errors: Sequence[float], threshold: float) -> int:
    """The slide length: 1 + the number of leading errors within ``threshold`` (at most ``len(errors)``).

    ``errors[i]`` compares the guess of step ``τ + i + 1`` with its replayed value. A non-finite error
    counts as unconverged.
    """
    for i, err in enumerate(errors):
        if not err <= threshold:
            return i + 1
    return len(errors)


def aggregate_errors(errors: Sequence[float], how: Aggregate) -> float:
    """A true median or the mean of the finite errors (``nan`` if none is finite)."""
    finite = sorted(e for e in errors if math.isfinite(e))
    if not finite:
        return math.nan
    if how == "mean":
        return sum(finite) / len(finite)
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])
