import random

import numpy as np
import pytest
import torch

from lightning_picard import current_step_seed, step_generator, step_rng, step_seed


def _draw():
    return torch.rand(()).item(), float(np.random.rand()), random.random()


def test_step_rng_is_a_function_of_seed_and_step_and_restores_state():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with step_rng(7, 3) as value:
        first = _draw()
        assert current_step_seed() == value == step_seed(7, 3) == 10
    assert torch.equal(torch.get_rng_state(), before)
    with step_rng(7, 3):
        assert _draw() == first
    with step_rng(7, 4):
        assert _draw() != first
    assert current_step_seed() is None


def test_step_rng_restores_state_when_the_body_raises():
    before = torch.get_rng_state()
    with pytest.raises(KeyError), step_rng(0, 1):
        raise KeyError
    assert torch.equal(torch.get_rng_state(), before)


def test_step_generator_needs_a_step_and_separates_streams():
    with pytest.raises(RuntimeError, match="outside a seeded training step"):
        step_generator()
    with step_rng(0, 2):
        a = torch.rand(3, generator=step_generator()).tolist()
        b = torch.rand(3, generator=step_generator()).tolist()
        c = torch.rand(3, generator=step_generator(offset=1)).tolist()
    assert a == b and a != c


def test_seeding_formats_no_stack_traces_for_backends_that_are_not_there(monkeypatch):
    """``torch.manual_seed`` formats a stack trace per uninitialised backend (CUDA, XPU, MTIA): 2 ms a step."""
    import traceback

    from lightning_picard.rng import seed_all

    if torch.cuda.is_available():
        pytest.skip("CUDA machines seed CUDA on purpose")
    calls = []
    original = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: calls.append(1) or original(*a, **k))
    seed_all(3)
    assert calls == []
    torch.manual_seed(3)  # what seed_all used to call
    assert calls  # the check above can fail
