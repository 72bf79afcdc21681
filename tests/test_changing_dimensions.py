"""Changing dimensions and step-dependent buffers under Picard: the toy grows, prunes and refreshes a grid."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_picard as lp
from tests.toy import quiet_trainer_kwargs
from tests.toy_resizing import GrowingBumps, assert_same_state, step_data

STEPS = 20


def _sequential(steps=STEPS):
    module = GrowingBumps()
    pl.Trainer(devices=1, max_steps=steps, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs()).fit(
        module, step_data()
    )
    return module


def _picard(window_size, threshold=0.0, devices=1, init="copy", steps=STEPS, module_class=GrowingBumps):
    module = module_class()
    strategy = lp.PicardStrategy(
        window_size=window_size,
        threshold=threshold,
        init=init,
        start_method="fork" if devices > 1 else "popen",
    )
    trainer = pl.Trainer(devices=devices, max_steps=steps, strategy=strategy, **quiet_trainer_kwargs())
    trainer.fit(module, step_data())
    return module, trainer


@pytest.fixture(scope="module")
def sequential():
    return _sequential()


def test_the_toy_really_grows_and_prunes(sequential):
    assert [step for step, _, _ in sequential.resizes] == [2, 5, 8, 11, 14, 17]
    assert sum(pruned for _, pruned, _ in sequential.resizes) > 0
    assert sum(cloned for _, _, cloned in sequential.resizes) > 0
    assert sequential.occupancy.min() == 0 and sequential.level == 2


@pytest.mark.parametrize("init", ["copy", "extrapolate"])
@pytest.mark.parametrize("window_size", [1, 2, 3, 5])
def test_threshold_zero_reproduces_a_growing_and_pruning_run_bit_for_bit(sequential, window_size, init):
    module, trainer = _picard(window_size, init=init)
    assert_same_state(module, sequential)
    assert trainer.global_step == STEPS


@pytest.mark.multiprocess
@pytest.mark.parametrize("init", ["copy", "extrapolate"])
def test_two_ranks_with_rows_of_different_sizes_are_exact(sequential, init):
    module, _ = _picard(4, devices=2, init=init)
    assert_same_state(module, sequential)


class _StepOutputNotDeclared(GrowingBumps):
    def picard_step_outputs(self):
        return []

    def picard_buffers(self):
        return {**super().picard_buffers(), "hits": False}


def test_step_outputs_travel_with_the_gradients_and_are_needed(sequential):
    """``hits`` is written by training_step and read by the step hook: as a mere buffer the replay would read
    the guess's value, not the evaluated step's."""
    module, _ = _picard(3)
    assert_same_state(module, sequential)
    undeclared, _ = _picard(3, module_class=_StepOutputNotDeclared)
    with pytest.raises(AssertionError):
        assert_same_state(undeclared, sequential)


def test_a_positive_threshold_converges_in_fewer_rounds_through_the_resizes(sequential):
    module, trainer = _picard(6, threshold=1e-3)
    rounds = trainer.callback_metrics["picard/rounds"].item()
    assert rounds < STEPS
    assert module.resizes, "the replay must have run the densification"
    loss = _loss(module)
    assert loss < 1.5 * _loss(sequential) + 0.05


def _loss(module):
    generator = torch.Generator().manual_seed(99)
    x = torch.rand(512, 2, generator=generator) * 2 - 1
    target = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])
    with torch.no_grad():
        return (module(x) - target).square().mean().item()


def test_a_checkpoint_of_a_resized_run_resumes_exactly(sequential, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1, filename="{step}")
    first = GrowingBumps()
    strategy = lp.PicardStrategy(window_size=4, threshold=0.0)
    kwargs = quiet_trainer_kwargs(enable_checkpointing=True)
    pl.Trainer(devices=1, max_steps=STEPS, strategy=strategy, callbacks=[checkpoint], **kwargs).fit(
        first, step_data()
    )
    resumed = GrowingBumps()
    strategy = lp.PicardStrategy(window_size=4, threshold=0.0)
    pl.Trainer(devices=1, max_steps=STEPS, strategy=strategy, **quiet_trainer_kwargs()).fit(
        resumed, step_data(), ckpt_path=tmp_path / "step=10.ckpt"
    )
    assert_same_state(resumed, sequential)


class _Unreported(GrowingBumps):
    def _densify_and_prune(self, step):
        super()._densify_and_prune(step)
        return None


class _ReplacesParameters(GrowingBumps):
    def _densify_and_prune(self, step):
        super()._densify_and_prune(step)
        self.heights = torch.nn.Parameter(self.heights.detach().clone())
        return None


class _UnknownName(GrowingBumps):
    def _densify_and_prune(self, step):
        return {**super()._densify_and_prune(step), "widths": torch.zeros(1, dtype=torch.int64)}


class _BuffersNotAMapping(GrowingBumps):
    def picard_buffers(self):
        return ["occupancy"]


class _UnknownBuffer(GrowingBumps):
    def picard_buffers(self):
        return {"occupancy_grid": True}


class _OutputIsAlsoABuffer(GrowingBumps):
    def picard_buffers(self):
        return {**super().picard_buffers(), "hits": False}


class _OutputOfTheWrongSize(GrowingBumps):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.hits = torch.zeros(self.hits.shape[0] + 1)
        return loss


class _OutputsAsAString(GrowingBumps):
    def picard_step_outputs(self):
        return "hits"


@pytest.mark.parametrize(
    ("module_class", "error", "match"),
    [
        (_Unreported, ValueError, "changed shape from .* without reporting it"),
        (_ReplacesParameters, Exception, r"param.data = new_rows"),
        (_UnknownName, ValueError, r"reported resizing \['widths'\]"),
        (_BuffersNotAMapping, TypeError, "must return a mapping"),
        (_UnknownBuffer, ValueError, "'occupancy_grid', which is not a buffer"),
        (_OutputIsAlsoABuffer, ValueError, r"\['hits'\] are named by both"),
        (_OutputsAsAString, TypeError, "must return buffer names"),
        (_OutputOfTheWrongSize, ValueError, r"Step output 'hits' has shape \(7,\) after training_step"),
    ],
)
def test_protocol_mistakes_get_errors_that_say_what_to_do(module_class, error, match):
    strategy = lp.PicardStrategy(window_size=2, threshold=0.0)
    trainer = pl.Trainer(devices=1, max_steps=6, strategy=strategy, **quiet_trainer_kwargs())
    with pytest.raises(error, match=match):
        trainer.fit(module_class(), step_data())


@pytest.mark.parametrize(
    ("module_class", "match"),
    [(_Unreported, "without reporting it"), (_UnknownName, r"reported resizing \['widths'\]")],
)
def test_the_sequential_reference_checks_resize_reports_too(module_class, match):
    trainer = pl.Trainer(devices=1, max_steps=6, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match=match):
        trainer.fit(module_class(), step_data())


def test_extrapolated_guesses_leave_the_step_hook_out(monkeypatch):
    """Extrapolating past the window repeats the last gradient; densifying on it made poor guesses."""
    from lightning_picard.window import PicardWindow

    filling, hook_calls, extrapolated = {"on": False}, [], []
    fill = PicardWindow._fill_new_slots

    def spy(self, n, skip, *args, **kwargs):
        filling["on"] = True
        extrapolated.append(n == self.window_size)
        try:
            return fill(self, n, skip, *args, **kwargs)
        finally:
            filling["on"] = False

    class Spy(GrowingBumps):
        def picard_after_optimizer_step(self, step):
            hook_calls.append(filling["on"])
            return super().picard_after_optimizer_step(step)

    monkeypatch.setattr(PicardWindow, "_fill_new_slots", spy)
    _picard(4, threshold=1e-3, init="extrapolate", module_class=Spy)
    assert any(extrapolated), "some rounds must have extrapolated"
    assert hook_calls and not any(hook_calls)


def test_bf16_true_resizing_run_is_exact_too():
    kwargs = quiet_trainer_kwargs(precision="bf16-true")
    reference = GrowingBumps()
    pl.Trainer(devices=1, max_steps=12, callbacks=[lp.StepSeed(0)], **kwargs).fit(reference, step_data())
    module = GrowingBumps()
    strategy = lp.PicardStrategy(window_size=3, threshold=0.0)
    pl.Trainer(devices=1, max_steps=12, strategy=strategy, **kwargs).fit(module, step_data())
    assert module.heights.dtype == torch.bfloat16
    assert_same_state(module, reference)
