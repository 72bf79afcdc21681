"""Progress bars that count optimizer steps and show Picard's rounds.

Lightning's bars describe a step-bounded run as "Epoch 0/-2". These say ``step τ/T`` and, under
:class:`~lightning_picard.PicardStrategy`, the rounds so far and the converged steps per round. Use
:class:`PicardProgressBar` (tqdm) or :class:`PicardRichProgressBar` (rich) in ``Trainer(callbacks=…)``, or
:func:`picard_progress_bar` to get the one matching the Trainer's default bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from typing_extensions import override


def step_description(trainer: pl.Trainer) -> str | None:
    """``"step τ/T"`` for a run bounded by ``max_steps`` alone, else ``None`` (Lightning's epoch text)."""
    if trainer.max_steps is None or trainer.max_steps < 0:
        return None
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return None
    return f"step {trainer.global_step}/{trainer.max_steps}"


def picard_metrics(trainer: pl.Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the Picard counters shown as ``rounds`` and ``steps/round`` and no version number."""
    shown = {key: value for key, value in metrics.items() if key not in ("v_num", "picard/steps_per_round")}
    rounds = trainer.callback_metrics.get("picard/rounds")
    per_round = trainer.callback_metrics.get("picard/steps_per_round")
    if rounds is not None:
        shown["rounds"] = str(int(rounds.item()))
    if per_round is not None:
        shown["steps/round"] = f"{per_round.item():.2f}"
    return shown


class PicardProgressBar(TQDMProgressBar):
    """tqdm bar: ``step τ/T`` for step-bounded runs, and Picard's ``rounds`` and ``steps/round``.

    Same arguments as :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._describe(trainer)
        super().on_train_batch_end(trainer, pl_module, *args)

    def _describe(self, trainer: pl.Trainer) -> None:
        description = step_description(trainer)
        if description is not None:
            self.train_progress_bar.set_description(description, refresh=False)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return picard_metrics(trainer, super().get_metrics(trainer, pl_module))


class PicardRichProgressBar(RichProgressBar):
    """rich bar: ``step τ/T`` for step-bounded runs, and Picard's ``rounds`` and ``steps/round``.

    Same arguments as :class:`~lightning.pytorch.callbacks.RichProgressBar`.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        return step_description(self.trainer) or super()._get_train_description(current_epoch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        description = step_description(trainer)
        if description is not None and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=description)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return picard_metrics(trainer, super().get_metrics(trainer, pl_module))


def picard_progress_bar(trainer: pl.Trainer) -> ProgressBar | None:
    """The Picard-aware bar of the same kind as ``trainer``'s bar (None when the bar is off or customised)."""
    current = trainer.progress_bar_callback
    if type(current) is RichProgressBar:
        return PicardRichProgressBar()
    if type(current) is TQDMProgressBar:
        return PicardProgressBar()
    return None
