"""Random draws for guidance losses that come from the per-step seed, never from a private stream.

Every function takes an optional ``torch.Generator``. When it is given, the draw happens on the
generator's device and is then moved to the target device, so a CPU generator works for CUDA tensors
and the result depends on the generator alone. Without it, the global torch RNG of the target device
is used; the Picard strategy (and the ``StepSeed`` callback for sequential runs) seeds that RNG per
step, so a step sees the same t, noise and Δt on every Picard sweep.
"""

from __future__ import annotations

import torch


def _draw_device(device: torch.device, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else device


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise with the shape, dtype and device of ``x``."""
    device = _draw_device(x.device, generator)
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def rand(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform [0, 1) float32 samples on ``device``."""
    return torch.rand(shape, generator=generator, device=_draw_device(device, generator)).to(device)


def randint(
    low: int,
    high: int,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integers uniform in [low, high) as int64 on ``device``."""
    drawn = torch.randint(low, high, shape, generator=generator, device=_draw_device(device, generator))
    return drawn.to(device)
