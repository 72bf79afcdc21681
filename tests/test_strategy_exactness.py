"""PicardStrategy against the StepSeed sequential reference, through a real Trainer."""

import lightning.pytorch as pl
import pytest
import torch

import lightning_picard as lp
from tests.toy import ToyRegression, final_parameters, quiet_trainer_kwargs, regression_data

STEPS = 12


def _sequential(optimizer: str) -> torch.Tensor:
    module = ToyRegression(optimizer=optimizer)
    trainer = pl.Trainer(
        devices=1,
        max_steps=STEPS,
        gradient_clip_val=0.5,
        callbacks=[lp.StepSeed(0)],
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    return final_parameters(module)


@pytest.fixture(scope="module")
def sequential_reference():
    return {name: _sequential(name) for name in ("adam", "adamw")}


def _picard(devices: int, window_size: int, optimizer: str, threshold: float = 0.0, **kwargs):
    module = ToyRegression(optimizer=optimizer)
    strategy = lp.PicardStrategy(
        window_size=window_size,
        threshold=threshold,
        start_method="fork" if devices > 1 else "popen",
        **kwargs,
    )
    trainer = pl.Trainer(
        devices=devices, max_steps=STEPS, gradient_clip_val=0.5, strategy=strategy, **quiet_trainer_kwargs()
    )
    trainer.fit(module, regression_data())
    return module, trainer


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("window_size", [1, 2, 3, 4])
@pytest.mark.parametrize("devices", [1, 2])
def test_threshold_zero_is_bit_identical_to_sequential(sequential_reference, devices, window_size, optimizer):
    module, trainer = _picard(devices, window_size, optimizer)
    assert torch.equal(final_parameters(module), sequential_reference[optimizer])
    rounds = trainer.callback_metrics["picard/rounds"].item()
    assert 1 <= rounds <= STEPS


def test_sequential_reference_differs_without_step_seeds(sequential_reference):
    module = ToyRegression()
    trainer = pl.Trainer(devices=1, max_steps=STEPS, gradient_clip_val=0.5, **quiet_trainer_kwargs())
    torch.manual_seed(99)
    trainer.fit(module, regression_data())
    assert not torch.equal(final_parameters(module), sequential_reference["adam"]), (
        "the test must be sensitive"
    )


def test_single_device_sees_the_step_and_batch_index_of_each_slot():
    module, trainer = _picard(1, 3, "adam")
    assert trainer.global_step == STEPS
    assert all(step == batch_idx for step, batch_idx in module.seen_steps)
    assert {step for step, _ in module.seen_steps} == set(range(STEPS)), "the window never passes max_steps"


@pytest.mark.multiprocess
@pytest.mark.parametrize("init", ["copy", "extrapolate"])
def test_positive_threshold_needs_fewer_rounds_and_stays_close(sequential_reference, init):
    module, trainer = _picard(2, 4, "adam", threshold=1e-4, init=init)
    rounds = trainer.callback_metrics["picard/rounds"].item()
    assert rounds < STEPS
    distance = (final_parameters(module) - sequential_reference["adam"]).square().mean().item()
    assert distance < 1e-3
    assert trainer.callback_metrics["picard/steps_per_round"].item() == pytest.approx(STEPS / rounds)
