"""Per-step randomness: every random draw of optimizer step ``s`` is a function of ``(seed, s)``.

Picard evaluates a step several times, on different processes, before it is final. For the result to be
the sequential one, step ``s`` must see the same random numbers every time: the same diffusion timestep,
noise, camera and dropout mask. :func:`step_rng` seeds torch (CPU and CUDA), numpy and :mod:`random` to
``seed + s`` for the duration of one step and restores the previous state afterwards, so nothing outside
the step is affected and nothing inside depends on what ran before it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for the plugin
    np = None

_MAX_SEED = 2**32

_current_step_seed: ContextVar[int | None] = ContextVar("lightning_picard_step_seed", default=None)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of optimizer step ``step`` in a run seeded with ``seed``.

    ``stream`` 0 is the step's evaluation (``training_step`` and backward); other streams (the step hook) get
    seeds of their own.
    """
    if stream == 0:
        return (seed + step) % _MAX_SEED
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729 + 1) % _MAX_SEED


def get_rng_states() -> dict[str, Any]:
    """The current states of torch (CPU, and CUDA if initialised), numpy and :mod:`random`."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if np is not None:
        states["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states returned by :func:`get_rng_states`."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_all(value: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and :mod:`random` with ``value``.

    Only the backends that exist are seeded: ``torch.manual_seed`` also queues a lazy seeding call, with a
    formatted stack trace, for every backend that is not initialised (CUDA, XPU, MTIA on a CPU machine), and
    that queue grows by one entry per call for the whole run (2 ms and three stack traces per step).
    """
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(value)
    random.seed(value)
    if np is not None:
        np.random.seed(value)


@contextmanager
def step_rng(seed: int, step: int, stream: int = 0) -> Iterator[int]:
    """Run the body with every global RNG seeded for optimizer step ``step``; restore them afterwards.

    Yields the step's seed (of ``stream``, see :func:`step_seed`). Inside the body, :func:`step_generator` returns generators seeded the same way.
    The previous RNG states are restored even if the body raises.
    """
    value = step_seed(seed, step, stream)
    saved = get_rng_states()
    token = _current_step_seed.set(value)
    try:
        seed_all(value)
        yield value
    finally:
        _current_step_seed.reset(token)
        set_rng_states(saved)


def current_step_seed() -> int | None:
    """The seed of the step being evaluated, or ``None`` outside a step seeded by Picard or :class:`StepSeed`."""
    return _current_step_seed.get()


def step_generator(device: torch.device | str | None = None, offset: int = 0) -> torch.Generator:
    """A fresh :class:`torch.Generator` seeded from the current step, for code that prefers explicit generators.

    Args:
        device: device of the generator (CPU by default).
        offset: distinguishes independent streams within one step (e.g. cameras vs. diffusion noise).

    Raises:
        RuntimeError: outside a step seeded by the Picard strategy or the :class:`StepSeed` callback.
    """
    value = current_step_seed()
    if value is None:
        raise RuntimeError(
            "step_generator() was called outside a seeded training step. It works inside training_step when "
            "training with strategy='picard' or with the lightning_picard.StepSeed callback."
        )
    return seeded_generator(value, device, offset)


def seeded_generator(
    step_seed: int, device: torch.device | str | None = None, offset: int = 0
) -> torch.Generator:
    """The generator :func:`step_generator` gives inside the step whose seed is ``step_seed``."""
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed((step_seed * 1_000_003 + offset) % 2**63)
    return generator
