"""Which part of a step's batch this rank evaluates: the data-parallel half of data-parallel × time-parallel.

Under :class:`~lightning_picard.PicardStrategy` with ``slot_group_size=G`` every window slot is evaluated by a
group of ``G`` ranks. All of them see the whole batch of the slot's step (and its step seed); each takes its own
part, and the group averages the slot's gradient, as data-parallel training averages one step's gradient over its
ranks. A module that draws its batch itself (prompts from the step seed) asks :func:`batch_shard` which part is
its own; the same code then runs on one device, under plain DDP and under Picard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import lightning.pytorch as pl


class BatchShard(NamedTuple):
    """Part ``index`` of ``count`` equal parts of a step's batch.

    Attributes:
        index: this rank's part, in ``[0, count)``.
        count: the number of ranks that share the step.
    """

    index: int
    count: int

    def slice(self, batch_size: int) -> slice:
        """The items of a ``batch_size`` batch that are this rank's: a contiguous slice of ``batch_size / count``.

        Raises:
            ValueError: if ``batch_size`` is not a multiple of ``count`` (the average of unequal parts' mean
                gradients would not be the batch's mean gradient).
        """
        if batch_size % self.count:
            raise ValueError(
                f"A batch of {batch_size} cannot be split evenly over the {self.count} ranks that evaluate each step: "
                f"use a batch size that is a multiple of {self.count} (or another slot_group_size)."
            )
        size = batch_size // self.count
        return slice(self.index * size, (self.index + 1) * size)


WHOLE_BATCH = BatchShard(0, 1)
"""The whole batch: one device, or one Picard rank per slot."""


def batch_shard(trainer: pl.Trainer | None) -> BatchShard:
    """The part of each step's batch this rank evaluates.

    - :class:`~lightning_picard.PicardStrategy`: the rank's place in its slot group (:attr:`WHOLE_BATCH` with the
      default ``slot_group_size=1``: each slot is one rank's whole step).
    - Other multi-process strategies (DDP, FSDP, …): ``(global_rank, world_size)``: the ranks share every step.
    - One device, or no trainer: :attr:`WHOLE_BATCH`.

    Only a module that builds its batch itself needs this (a dataloader's batches are split by Lightning's sampler
    under DDP); it then keeps ``batch[shard.slice(len(batch))]`` and returns that part's mean loss.
    """
    if trainer is None:
        return WHOLE_BATCH
    strategy = trainer.strategy
    own = getattr(strategy, "batch_shard", None)
    if isinstance(own, BatchShard):
        return own
    world_size = getattr(strategy, "world_size", 1)
    if world_size > 1:
        return BatchShard(strategy.global_rank, world_size)
    return WHOLE_BATCH
