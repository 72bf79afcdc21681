"""The convergence policy: errors in optimizer steps, the tolerance and threshold arguments, the cap, the cold round,
buffer weights."""

import math

import lightning.pytorch as pl
import pytest
import torch

import lightning_picard as lp
from lightning_picard.buffers import ModuleBuffers
from lightning_picard.convergence import step_relative_errors
from lightning_picard.flat import FlatParameters
from lightning_picard.hooks import picard_buffers
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow
from tests.toy import ToyRegression, final_parameters, quiet_trainer_kwargs, regression_data


def test_step_relative_errors_take_the_worst_tensor_against_its_own_step():
    errors = torch.tensor([[1e-4, 2.0], [4e-4, 0.0]], dtype=torch.float64)
    steps = torch.tensor([[1e-4, 4.0], [3e-4, 4.0]], dtype=torch.float64)
    weights = torch.ones(2, 2, dtype=torch.float64)
    relative, scale = step_relative_errors(errors, steps, weights)
    torch.testing.assert_close(scale, torch.tensor([2e-4, 4.0], dtype=torch.float64))
    # slot 0: 0.5 and 0.5; slot 1: 2.0 and 0 — tensors of very different sizes count alike
    torch.testing.assert_close(relative, torch.tensor([0.5, 2.0], dtype=torch.float64))
    # scale-free: the same errors in other units give the same result
    units = torch.tensor([1e6, 1e-6], dtype=torch.float64)
    torch.testing.assert_close(step_relative_errors(errors * units, steps * units, weights)[0], relative)
    # a weight scales a tensor's share; weight 0 leaves it out
    weighted = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        step_relative_errors(errors, steps, weighted)[0], torch.tensor([0.5, 2.0]).double()
    )
    weighted = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        step_relative_errors(errors, steps, weighted)[0], torch.tensor([0.5, 0.0]).double()
    )


def test_step_relative_errors_at_the_edges():
    weights = torch.ones(1, 3, dtype=torch.float64)
    errors = torch.tensor([[0.0, 1e-9, 1.0]], dtype=torch.float64)
    steps = torch.tensor([[0.0, 0.0, math.nan]], dtype=torch.float64)
    relative, _ = step_relative_errors(errors[:, :2], steps[:, :2], weights[:, :2])
    assert relative.item() == math.inf, "a guess off where nothing moved is never converged"
    relative, scale = step_relative_errors(errors, steps, weights)
    assert math.isnan(scale[2].item()) and math.isnan(relative.item()), "no comparable step and no fallback"
    relative, _ = step_relative_errors(
        errors[:, [0, 2]], steps[:, [0, 2]], weights[:, :2], torch.tensor([0, 4.0])
    )
    assert relative.item() == pytest.approx(0.25), "the previous round's scale stands in after a resize"
    nan = torch.tensor([[math.nan, 0.0]], dtype=torch.float64)
    assert math.isnan(step_relative_errors(nan, torch.ones(1, 2).double(), weights[:, :2])[0].item())


def _noisy_quadratic(params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = 2 * (p.detach() - 1.0) + 0.1 * torch.randn(p.shape, generator=g)


def _run(steps, window_size, threshold, error_units, ema_decay=1.0, max_threshold=None):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=generator)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.Adam(params, lr=0.05)
    flat = FlatParameters(params)
    window = PicardWindow(
        flat, window_size, threshold, ema_decay, error_units=error_units, max_threshold=max_threshold
    )
    snapshot, rows, tau, results = OptimizerSnapshot(optimizer), flat.new_rows(window_size), 0, []
    while tau < steps:
        n = min(window_size, steps - tau)
        for j in range(n):
            window.load(j)
            _noisy_quadratic(params, tau + j)
            flat.write_gradients(rows[j])
        window.load(0)
        results.append(window.run_round(tau, n, lambda j: rows[j], lambda j: optimizer.step(), snapshot))
        tau += results[-1].skip
    return flat.flat.detach().clone(), results


def test_step_units_at_zero_are_exact_and_accept_within_the_tolerance():
    exact, _ = _run(20, 4, 0.0, "absolute")
    reference, results = _run(20, 1, 0.0, "absolute")
    assert torch.equal(exact, reference)
    same, results = _run(20, 4, 0.0, "step")
    assert torch.equal(same, reference)
    assert all(r.skip >= 1 for r in results)
    _, results = _run(20, 4, 1.0, "step")
    assert len(results) < 20
    for r in results:
        accepted = r.errors[: r.skip - 1]
        assert all(e <= 1.0 for e in accepted)
        if r.skip < len(r.errors):
            assert r.errors[r.skip - 1] > 1.0
    first = results[0]
    # the first round guesses the anchor for every slot: guess j is j steps behind, so err_j ≈ j² (in squared steps)
    assert first.errors[1] > 2.0 and first.errors[2] > first.errors[1]


def test_the_threshold_does_not_adapt_from_the_cold_first_round_and_stays_under_its_cap():
    _, results = _run(12, 4, 1e-3, "absolute", ema_decay=0.5)
    assert results[0].threshold == 1e-3, "the first round's guesses are copies of the anchor"
    assert results[1].threshold != 1e-3
    _, capped = _run(12, 4, 1e-3, "absolute", ema_decay=0.5, max_threshold=1e-3)
    assert all(r.threshold <= 1e-3 for r in capped)
    assert min(r.threshold for r in capped) < 1e-3, "the cap bounds, it does not freeze"


def test_tolerance_and_threshold_select_the_rule():
    default = lp.PicardStrategy()
    assert (default.error_units, default.threshold, default.ema_decay) == ("step", 0.1, 1.0)
    paper = lp.PicardStrategy(threshold=5e-6)
    assert (paper.error_units, paper.threshold, paper.ema_decay) == ("absolute", 5e-6, 0.9)
    custom = lp.PicardStrategy(tolerance=0.25, ema_decay=0.9, max_threshold=0.5)
    assert (custom.error_units, custom.threshold, custom.ema_decay, custom.max_threshold) == (
        "step",
        0.25,
        0.9,
        0.5,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": 1.0, "threshold": 5e-6}, "either tolerance"),
        ({"tolerance": -1.0}, "tolerance must be a number >= 0"),
        ({"tolerance": "1"}, "tolerance must be a number >= 0"),
        ({"max_threshold": -1.0}, "max_threshold must be None or a number >= 0"),
        ({"tolerance": 2.0, "max_threshold": 1.0}, "above max_threshold"),
        ({"threshold": 1e-3, "max_threshold": 1e-4}, "above max_threshold"),
    ],
)
def test_bad_policy_arguments_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.PicardStrategy(**kwargs)


def test_tolerance_zero_reproduces_the_sequential_run():
    kwargs = quiet_trainer_kwargs(devices=1, max_steps=10)
    sequential = ToyRegression()
    pl.Trainer(callbacks=[lp.StepSeed(0)], **kwargs).fit(sequential, regression_data())
    picard = ToyRegression()
    pl.Trainer(strategy=lp.PicardStrategy(window_size=4, tolerance=0), **kwargs).fit(
        picard, regression_data()
    )
    assert torch.equal(final_parameters(picard), final_parameters(sequential))


class _Weighted(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.register_buffer("count", torch.zeros(4))
        self.register_buffer("grid", torch.zeros(2))
        self.weights = weights

    def picard_buffers(self):
        return self.weights


def test_buffer_weights_scale_their_share_of_the_absolute_error():
    module = _Weighted({"count": 0.5, "grid": True})
    buffers = ModuleBuffers(module, picard_buffers(module))
    other = {"count": torch.ones(4), "grid": torch.ones(2)}
    total, size = buffers.squared_difference(other)
    assert total.item() == pytest.approx(0.5 * 4 + 2) and size == pytest.approx(0.5 * 4 + 2)
    zero = ModuleBuffers(module, {"count": 0.0, "grid": False})
    assert zero.squared_difference(other) == (None, 0.0)
    for bad in (-1.0, math.nan, "yes"):
        with pytest.raises(ValueError, match="finite weight >= 0"):
            picard_buffers(_Weighted({"count": bad}))


def test_step_units_through_resizes_and_counted_buffers():
    from tests.toy_resizing import GrowingBumps, assert_same_state, step_data

    def fit(strategy=None):
        module = GrowingBumps()
        callbacks = [] if strategy is not None else [lp.StepSeed(0)]
        kwargs = quiet_trainer_kwargs(devices=1, max_steps=15, callbacks=callbacks)
        trainer = pl.Trainer(**kwargs) if strategy is None else pl.Trainer(strategy=strategy, **kwargs)
        trainer.fit(module, step_data())
        return module, trainer

    sequential, _ = fit()
    exact, _ = fit(lp.PicardStrategy(window_size=3, tolerance=0))
    assert_same_state(exact, sequential)
    loose, trainer = fit(lp.PicardStrategy(window_size=4, tolerance=16.0))
    assert loose.resizes and trainer.callback_metrics["picard/rounds"].item() < 15
    assert math.isfinite(trainer.callback_metrics["picard/threshold"].item())
