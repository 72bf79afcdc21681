"""PicardRound: the gathered row format (dtype-independent status), slot ownership and the one-way round."""

import pytest
import torch

from lightning_picard.flat import FlatParameters
from lightning_picard.round import PicardRound, SlotOwnership
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow


def _round(dtype: torch.dtype, window_size: int = 3, world_size: int = 1, rank: int = 0):
    params = [torch.nn.Parameter(torch.ones(4, dtype=dtype)), torch.nn.Parameter(torch.zeros(2, dtype=dtype))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    window = PicardWindow(FlatParameters(params), window_size, 0.0, 1.0)
    ownership = SlotOwnership(world_size, rank, window_size)
    return params, optimizer, PicardRound(window, OptimizerSnapshot(optimizer), ownership, collectives=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_status_is_exact_in_every_dtype(dtype):
    """Flags, the step of a failure and the loss survive the row's dtype (16-bit rows hold no step above 2048
    as floats, and 65,504 is float16's largest)."""
    params, _, picard_round = _round(dtype)
    slots = picard_round.begin(3, sigterm=True)
    assert slots == [2, 1, 0]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    params[1].grad = None
    loss = torch.tensor(70_000.123456789, dtype=torch.float64).to(
        dtype if dtype != torch.float16 else torch.float32
    )
    picard_round.record_slot(0, stop=True, loss=loss, more=False)
    params[0].grad[0] = float("nan")
    picard_round.record_slot(1)
    picard_round.record_failure(2)
    tau = 100_000
    status = picard_round.gather(tau, 3)
    assert status.failed == [(tau + 2, 0)]
    assert status.nonfinite == [1] and status.stops == [0] and status.sigterm
    assert status.presence[0] == [True, False]
    first = status.losses[0]
    assert first is not None and first.dtype == loss.dtype and first.item() == loss.item()
    assert status.losses[1:] == [None, None] and status.loss_only == [True, False, False]
    assert status.accepted_limit(3) == 1, "the step that asked to stop is the last accepted"


def test_a_slot_that_returned_more_than_its_loss_is_marked():
    params, _, picard_round = _round(torch.float32, window_size=1)
    picard_round.begin(1)
    for p in params:
        p.grad = torch.zeros_like(p)
    picard_round.record_slot(0, loss=torch.tensor(2.0), more=True)
    status = picard_round.gather(0, 1)
    assert status.losses[0].item() == 2.0 and status.loss_only == [False] and not status.sigterm
    picard_round.begin(1)
    picard_round.record_slot(0)
    assert picard_round.gather(0, 1).losses == [None]


def test_a_nonfinite_guess_cuts_the_accepted_slots_but_the_anchor_does_not():
    params, _, picard_round = _round(torch.float32)
    picard_round.begin(3)
    for j in (2, 1, 0):
        for p in params:
            p.grad = torch.full_like(p, float("inf") if j == 2 else 1.0)
        picard_round.record_slot(j)
    status = picard_round.gather(0, 3)
    assert status.nonfinite == [2] and status.accepted_limit(3) == 2


def test_ownership_spreads_slots_round_robin_and_rows_are_contiguous_per_rank():
    ownership = SlotOwnership(world_size=3, rank=1, window_size=7)
    assert ownership.slots_per_rank == 3
    assert ownership.owned(7) == [4, 1] and ownership.owned(1) == []
    rows = [ownership.gathered_row(j) for j in range(7)]
    assert sorted(rows) == sorted(set(rows)) and max(rows) < 9
    assert [ownership.rank_of(r) for r in rows] == [j % 3 for j in range(7)]


def test_replay_accepts_exact_guesses_and_slides():
    params, optimizer, picard_round = _round(torch.float32, window_size=2)
    for _ in range(3):  # three rounds at threshold 0: one exact step each
        picard_round.begin(2)
        for j in (1, 0):
            picard_round.load(j)
            for p in params:
                p.grad = torch.ones_like(p)
            picard_round.record_slot(j)
        picard_round.load(0)
        status = picard_round.gather(0, 2)
        result = picard_round.replay(0, 2, status, apply_update=lambda j: optimizer.step())
        assert result.skip >= 1
    assert torch.all(params[0] < 1)


def test_the_strategy_exposes_the_last_round_to_callbacks():
    import lightning.pytorch as pl

    import lightning_picard as lp
    from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data

    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, trainer.strategy.last_round, trainer.strategy.at_round_end))

    strategy = lp.PicardStrategy(window_size=3, tolerance=1.0)
    assert strategy.last_round is None and not strategy.at_round_end
    trainer = pl.Trainer(
        devices=1, strategy=strategy, **quiet_trainer_kwargs(max_steps=9, callbacks=[Watch()])
    )
    trainer.fit(ToyRegression(), regression_data())
    assert [step for step, _, _ in seen] == list(range(1, 10)), "one call per step, global_step after it"
    rounds = [result for _, result, end in seen if end]
    assert 3 <= len(rounds) <= 9 and len({id(r) for r in rounds}) == len(rounds), "one round end per round"
    assert [r.window_start for r in rounds] == sorted({r.window_start for r in rounds})
    assert sum(r.skip for r in rounds) == 9 and all(len(r.errors) <= 3 for r in rounds)
    for step, result, end in seen:
        assert result.window_start < step <= result.window_start + result.skip
        assert end == (step == result.window_start + result.skip)
