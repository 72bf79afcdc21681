"""Callbacks: :class:`StepSeed`, the sequential reference with Picard's per-step randomness and step hook."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_picard.hooks import run_after_optimizer_step
from lightning_picard.rng import step_rng


class StepSeed(Callback):
    """Run every training step of a sequential run exactly as :class:`PicardStrategy` runs it.

    Step ``s`` runs with torch (CPU and CUDA), numpy and :mod:`random` seeded to ``seed + s``, from
    ``on_train_batch_start`` to ``on_train_batch_end``; the previous RNG states are restored afterwards.
    After the optimizer step, in ``on_train_batch_end``, it runs the module's ``picard_after_optimizer_step``
    hook (resizes, step-dependent buffers) as the Picard replay does. A run with this callback is the
    reference that a Picard run with ``threshold=0`` reproduces bit for bit. Under :class:`PicardStrategy` it
    does nothing (the strategy seeds each evaluation and runs the hook in the replay itself).

    Args:
        seed: base of the per-step seeds; use the strategy's ``seed``.
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        self.seed = seed
        self._context: ExitStack | None = None
        self._last_hooked_step = 0

    def _active(self, trainer: pl.Trainer) -> bool:
        from lightning_picard.strategy import PicardStrategy

        return not isinstance(trainer.strategy, PicardStrategy)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_hooked_step = trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        if self._active(trainer):
            self._context = ExitStack()
            self._context.enter_context(step_rng(self.seed, trainer.global_step))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        if self._active(trainer) and trainer.global_step > self._last_hooked_step:
            self._last_hooked_step = trainer.global_step
            run_after_optimizer_step(pl_module, self.seed, trainer.global_step - 1, validate=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # on_train_batch_start returned -1: that batch has no on_train_batch_end

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None
