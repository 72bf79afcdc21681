"""The pure-torch Picard pieces, without Lightning or processes."""

import math

import pytest
import torch

from lightning_picard.convergence import aggregate_errors, first_unconverged
from lightning_picard.flat import FlatParameters
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow


def test_first_unconverged_counts_leading_converged_steps():
    assert first_unconverged([0.0, 0.0, 0.0], 0.0) == 3
    assert first_unconverged([0.0, 1e-3, 0.0], 1e-4) == 2
    assert first_unconverged([1.0, 0.0], 1e-4) == 1
    assert first_unconverged([0.0, math.nan, 0.0], 1.0) == 2, "a NaN error must count as unconverged"
    assert first_unconverged([0.0, math.inf], 1.0) == 2


def test_aggregate_is_a_true_median_not_the_middle_slot():
    errors = [5.0, 1.0, 100.0, 2.0]
    assert aggregate_errors(errors, "median") == pytest.approx(3.5)
    assert aggregate_errors([3.0, 1.0, 2.0], "median") == 2.0
    assert aggregate_errors(errors, "mean") == pytest.approx(27.0)
    assert aggregate_errors([math.nan, 1.0], "mean") == 1.0
    assert math.isnan(aggregate_errors([math.nan], "median"))


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


def test_flat_parameters_are_views_and_gradient_rows_carry_presence():
    params = _params()
    before = [p.detach().clone() for p in params]
    flat = FlatParameters(params)
    assert flat.numel == 10 and flat.row_length == 12
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    flat.flat.add_(1.0)
    assert torch.equal(params[0], before[0] + 1.0), "parameters must be views of the flat buffer"

    params[0].grad = torch.ones(3, 2)
    params[1].grad = None
    row = flat.new_rows(1)[0]
    flat.write_gradients(row)
    assert flat.presence(row) == [True, False]
    assert torch.equal(row[2:8], torch.ones(6)) and torch.equal(row[8:12], torch.zeros(4))

    params[0].grad = None
    flat.load_gradients(row, flat.presence(row))
    assert params[1].grad is None
    params[0].grad.mul_(0.5)  # in-place clipping must not touch the row
    assert torch.equal(row[2:8], torch.ones(6))


def test_flat_parameters_reject_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        FlatParameters(
            [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
        )


def test_optimizer_snapshot_is_a_copy_not_an_alias():
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    snapshot = OptimizerSnapshot(optimizer, [scheduler])
    snapshot.capture()
    saved = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    lr = optimizer.param_groups[0]["lr"]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.state[params[0]]["step"].item() == 4
    snapshot.restore()
    for k, v in saved.items():
        assert torch.equal(optimizer.state[params[0]][k], v), k
    assert optimizer.param_groups[0]["lr"] == lr
    assert scheduler.last_epoch == 1
    optimizer.step()  # stepping after a restore must not change the snapshot
    snapshot.restore()
    for k, v in saved.items():
        assert torch.equal(optimizer.state[params[0]][k], v), k
    with pytest.raises(RuntimeError, match="before capture"):
        OptimizerSnapshot(optimizer).restore()


def test_snapshot_of_a_fresh_optimizer_restores_empty_state():
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.1)
    snapshot = OptimizerSnapshot(optimizer)
    snapshot.capture()
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    snapshot.restore()
    assert len(optimizer.state) == 0


def _loss_grad(params, step):
    """A deterministic noisy quadratic: the gradient depends on the parameters and the step's seed."""
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = 2 * (p.detach() - 1.0) + 0.1 * torch.randn(p.shape, generator=g)


def _sequential(steps):
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.05)
    for s in range(steps):
        _loss_grad(params, s)
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def _picard(steps, window_size, threshold, init="copy"):
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.05)
    flat = FlatParameters(params)
    window = PicardWindow(flat, window_size, threshold, ema_decay=0.9, init=init)
    snapshot = OptimizerSnapshot(optimizer)
    rows = flat.new_rows(window_size)
    tau = 0
    while tau < steps:
        n = min(window_size, steps - tau)
        for j in range(n):
            window.load(j)
            _loss_grad(params, tau + j)
            flat.write_gradients(rows[j])
        window.load(0)
        result = window.run_round(tau, n, lambda j: rows[j], lambda j: optimizer.step(), snapshot)
        tau += result.skip
    return flat.flat.detach().clone(), window.rounds


@pytest.mark.parametrize("init", ["copy", "extrapolate"])
@pytest.mark.parametrize("window_size", [1, 2, 3, 5])
def test_threshold_zero_reproduces_sequential_bit_for_bit(window_size, init):
    reference = _sequential(17)
    result, rounds = _picard(17, window_size, 0.0, init)
    assert torch.equal(result, reference)
    assert rounds <= 17


@pytest.mark.parametrize("init", ["copy", "extrapolate"])
def test_positive_threshold_takes_fewer_rounds_and_stays_close(init):
    reference = _sequential(40)
    result, rounds = _picard(40, 8, 1e-4, init)
    assert rounds < 20
    assert (result - reference).square().mean().item() < 1e-3


def test_abort_round_puts_the_anchor_back():
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.05)
    flat = FlatParameters(params)
    window = PicardWindow(flat, 3, 0.0, ema_decay=0.9)
    snapshot = OptimizerSnapshot(optimizer)
    rows = flat.new_rows(3)
    for j in range(3):
        _loss_grad(params, j)
        flat.write_gradients(rows[j])
    window.run_round(0, 3, lambda j: rows[j], lambda j: optimizer.step(), snapshot)
    anchor = flat.flat.clone()
    anchor_state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}

    calls = []

    def failing_update(j):
        calls.append(j)
        optimizer.step()
        if len(calls) == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        window.run_round(1, 3, lambda j: rows[j], failing_update, snapshot)
    assert not torch.equal(flat.flat, anchor)
    assert window.abort_round() is True
    assert torch.equal(flat.flat, anchor)
    for k, v in anchor_state.items():
        assert torch.equal(optimizer.state[params[0]][k], v)
    assert window.abort_round() is False


def test_squared_norm_never_rounds_a_real_difference_to_zero():
    from lightning_picard.convergence import squared_norm

    tiny = torch.zeros(1000)
    tiny[3] = 1e-30  # its float32 square underflows
    assert squared_norm(tiny).item() > 0
    assert squared_norm(torch.zeros(10)).item() == 0
    x = torch.randn(10_000)
    assert squared_norm(x).item() == pytest.approx(x.double().square().sum().item(), rel=1e-5)
    assert squared_norm(x.to(torch.bfloat16)).dtype == torch.float64
    assert squared_norm(torch.zeros(0, 3)).item() == 0.0, "a tensor whose rows were all pruned"


def test_window_state_round_trips_and_the_earlier_tensor_format_still_loads():
    params = _params()
    flat = FlatParameters(params)
    window = PicardWindow(flat, 2, 1e-3, ema_decay=0.9)
    window._row(1).values.add_(1.0)
    state = window.state_dict()
    restored = PicardWindow(flat, 2, 0.0, ema_decay=0.9)
    assert "restored 2 guesses" in restored.load_state_dict(state)
    assert torch.equal(restored.guess(1), window.guess(1)) and restored.threshold == 1e-3

    earlier = {"guesses": torch.stack([window.guess(j) for j in range(3)]), "threshold": 0.5, "rounds": 4}
    assert "restored" in restored.load_state_dict(earlier)
    assert torch.equal(restored.guess(1), window.guess(1)) and restored.rounds == 4

    other = PicardWindow(flat, 3, 0.0, ema_decay=0.9)
    assert "re-initialised" in other.load_state_dict(state)
    assert torch.equal(other.guess(2), flat.flat)


def test_nonfinite_detection_without_a_full_size_temporary():
    from lightning_picard.round import _has_nonfinite

    assert not _has_nonfinite(torch.tensor([1.0, -2.0]))
    assert _has_nonfinite(torch.tensor([1.0, math.nan]))
    assert _has_nonfinite(torch.tensor([math.inf, 0.0])) and _has_nonfinite(torch.tensor([-math.inf, 0.0]))
    assert not _has_nonfinite(torch.zeros(0))
