"""The Picard progress bars: steps instead of "Epoch 0/-2", rounds and steps per round."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_picard.progress import (
    PicardProgressBar,
    PicardRichProgressBar,
    picard_metrics,
    picard_progress_bar,
    step_description,
)


def test_a_step_bounded_run_is_described_in_steps():
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, logger=False)
    assert step_description(trainer) == "step 0/7"
    assert PicardRichProgressBar()._get_train_description.__qualname__.startswith("PicardRichProgressBar")
    assert step_description(pl.Trainer(accelerator="cpu", max_epochs=3, logger=False)) is None


def test_picard_counters_replace_the_long_metric_name():
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, logger=False)
    trainer.callback_metrics.update(
        {"picard/rounds": torch.tensor(3.0), "picard/steps_per_round": torch.tensor(2.333)}
    )
    shown = picard_metrics(trainer, {"v_num": 0, "picard/steps_per_round": 2.333, "loss": 0.5})
    assert shown == {"loss": 0.5, "rounds": "3", "steps/round": "2.33"}


def test_the_bar_matches_the_trainers_kind():
    for default, expected in (
        (TQDMProgressBar(), PicardProgressBar),
        (RichProgressBar(), PicardRichProgressBar),
    ):
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[default])
        assert type(picard_progress_bar(trainer)) is expected
    assert picard_progress_bar(pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False)) is None
