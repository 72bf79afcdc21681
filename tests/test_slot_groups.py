"""Data-parallel × time-parallel: window slots evaluated by groups of ranks (``slot_group_size``)."""

import math
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_picard as lp
from lightning_picard.round import SlotOwnership
from tests.toy import final_parameters, quiet_trainer_kwargs, regression_data

STEPS = 8
BATCH = 4


class ShardedRegression(pl.LightningModule):
    """A regression whose step draws its randomness for the whole batch, then keeps this rank's part."""

    def __init__(self, record_to=None) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.record_to = record_to

    def training_step(self, batch, batch_idx):
        x, y = batch
        noise = 0.05 * torch.randn(x.shape[0], 1)  # the whole batch's draw, from the step seed
        shard = lp.batch_shard(self.trainer)
        part = shard.slice(x.shape[0])
        if self.record_to is not None:
            (self.record_to / f"rank{self.global_rank}").write_text(f"{shard.index} {shard.count} {part}")
        return (self.net(x[part]) + noise[part] - y[part]).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _fit(devices: int, **strategy_kwargs) -> tuple[ShardedRegression, pl.Trainer]:
    return _fit_module(ShardedRegression(), devices, **strategy_kwargs)


def _fit_module(
    module: ShardedRegression, devices: int, **strategy_kwargs
) -> tuple[ShardedRegression, pl.Trainer]:
    if devices == 1 and not strategy_kwargs:
        trainer = pl.Trainer(devices=1, max_steps=STEPS, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs())
    else:
        strategy = lp.PicardStrategy(start_method="fork", **strategy_kwargs)
        trainer = pl.Trainer(devices=devices, max_steps=STEPS, strategy=strategy, **quiet_trainer_kwargs())
    trainer.fit(module, regression_data(batch_size=BATCH))
    return module, trainer


def test_ownership_of_slot_groups():
    # 6 ranks in 3 groups of 2; rank 3 is member 1 of group 1.
    ownership = SlotOwnership(world_size=6, rank=3, window_size=5, group_size=2)
    assert (ownership.groups, ownership.group, ownership.member, ownership.slots_per_rank) == (3, 1, 1, 2)
    assert ownership.owned(5) == [4, 1]
    assert [ownership.gathered_row(j) for j in range(5)] == [0, 2, 4, 1, 3]
    assert ownership.status_rows(4) == [5, 7] and ownership.status_rows(0) == [0, 2]
    assert [ownership.rank_of(row) for row in ownership.status_rows(4)] == [2, 3]
    with pytest.raises(ValueError, match="does not divide the 4 processes"):
        SlotOwnership(world_size=4, rank=0, window_size=2, group_size=3)


def test_batch_shard_outside_picard_and_uneven_batches():
    assert lp.batch_shard(None) == lp.BatchShard(0, 1)
    assert lp.BatchShard(1, 2).slice(6) == slice(3, 6)
    with pytest.raises(ValueError, match="multiple of 2"):
        lp.BatchShard(0, 2).slice(5)
    with pytest.raises(ValueError, match="positive int"):
        lp.PicardStrategy(slot_group_size=0)


@pytest.mark.multiprocess
def test_two_slots_of_two_ranks_equal_data_parallel_bit_for_bit_and_sequential_to_rounding(tmp_path):
    """4 processes as 2 slots × 2 ranks at threshold 0 give the 2-rank data-parallel run (window 1) bit for bit:
    both average the same two parts of each batch with the same reduction. Against one process taking the whole
    batch they agree to rounding only: the mean over 4 items and the average of two means over 2 are the same
    number computed in another order."""
    time_and_data, trainer = _fit_module(ShardedRegression(tmp_path), 4, slot_group_size=2, tolerance=0)
    parts = {rank: (tmp_path / f"rank{rank}").read_text() for rank in range(4)}
    assert parts == {0: "0 2 slice(0, 2, None)", 1: "1 2 slice(2, 4, None)", 2: "0 2 slice(0, 2, None)",
                     3: "1 2 slice(2, 4, None)"}  # fmt: skip
    data_parallel, _ = _fit(2, slot_group_size=2, window_size=1, tolerance=0)
    sequential, _ = _fit(1)
    assert trainer.callback_metrics["picard/rounds"].item() == STEPS
    assert torch.equal(final_parameters(time_and_data), final_parameters(data_parallel))
    torch.testing.assert_close(
        final_parameters(time_and_data), final_parameters(sequential), rtol=1e-5, atol=1e-6
    )
    assert not torch.equal(final_parameters(sequential), final_parameters(ShardedRegression())), "it trained"


@pytest.mark.multiprocess
def test_a_slot_group_that_evaluates_several_slots_converges_with_a_positive_tolerance():
    module, trainer = _fit(2, slot_group_size=2, window_size=3, tolerance=0.1)
    sequential, _ = _fit(1)
    assert trainer.callback_metrics["picard/rounds"].item() < STEPS
    distance = (final_parameters(module) - final_parameters(sequential)).norm()
    assert distance < 0.05 * final_parameters(sequential).norm()


class FailsOnOneMember(ShardedRegression):
    """Rank 3 (member 1 of the second slot group) raises at step 5."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 3 and self.global_step == 5:
            raise ValueError("bad part")
        return super().training_step(batch, batch_idx)


class NonFinitePart(ShardedRegression):
    """Member 1's part of step 3 has a NaN gradient at a speculative guess; the group's average is NaN too."""

    def __init__(self, marker) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        guess = not torch.equal(self.trainer.strategy.flat.flat, self.trainer.strategy.window.guess(0))
        if guess and lp.batch_shard(self.trainer).index == 1 and self.global_step == 3:
            loss = loss * math.nan
            self.marker.write_text("nan")
        return loss


@pytest.mark.multiprocess
def test_a_failing_member_stops_every_rank_and_is_named():
    strategy = lp.PicardStrategy(start_method="fork", slot_group_size=2, tolerance=0)
    trainer = pl.Trainer(devices=4, max_steps=STEPS, strategy=strategy, **quiet_trainer_kwargs())
    with pytest.raises(Exception, match="bad part") as error:
        trainer.fit(FailsOnOneMember(), regression_data(batch_size=BATCH))
    assert re.search("rank 3 (failed )?while evaluating step 5", str(error.value))


@pytest.mark.multiprocess
def test_a_nonfinite_part_cuts_the_window_and_stays_exact(tmp_path):
    marker = tmp_path / "nan"
    module, _ = _fit(4, slot_group_size=2, tolerance=0)
    nonfinite, _ = _fit_module(NonFinitePart(marker), 4, slot_group_size=2, tolerance=0)
    assert marker.exists(), "the test must inject the NaN"
    assert torch.equal(final_parameters(nonfinite), final_parameters(module))


def test_a_group_size_that_does_not_divide_the_processes_is_refused():
    with pytest.raises(MisconfigurationException, match="slot_group_size=2 does not divide the 3 processes"):
        _fit(3, slot_group_size=2)
