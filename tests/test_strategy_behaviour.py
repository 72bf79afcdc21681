"""What a user sees of a Picard run: metrics, loggers, checkpoints, progress, validation, resume state."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_picard as lp
from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data

PICARD_METRICS = {
    "picard/skip",
    "picard/rounds",
    "picard/threshold",
    "picard/error_median",
    "picard/error_max",
    "picard/window_start",
    "picard/steps_per_round",
}


@pytest.mark.multiprocess
def test_metrics_reach_callback_metrics_and_loggers_on_the_step_axis(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        devices=2,
        max_steps=16,
        strategy=lp.PicardStrategy(window_size=4, threshold=1e-4, start_method="fork"),
        **quiet_trainer_kwargs(logger=logger, log_every_n_steps=1),
    )
    trainer.fit(ToyRegression(), regression_data())
    assert set(trainer.callback_metrics) >= PICARD_METRICS
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("picard/window_start")]
    steps = [int(r["step"]) for r in rows]
    starts = [int(float(r["picard/window_start"])) for r in rows]
    skips = [int(float(r["picard/skip"])) for r in rows]
    assert steps == starts, "the logger's step axis is τ, the window start"
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert sum(skips) == 16 and len(rows) < 16
    assert all(r["train_loss"] for r in rows), "the user's own metrics are logged with the round"


def test_logging_cadence_follows_log_every_n_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        devices=1,
        max_steps=20,
        strategy=lp.PicardStrategy(window_size=1, threshold=0.0),
        **quiet_trainer_kwargs(logger=logger, log_every_n_steps=5),
    )
    trainer.fit(ToyRegression(), regression_data())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("picard/window_start")]
    assert steps == [4, 9, 14, 19], "as sequential Lightning: the rounds completing steps 5, 10, 15, 20"


@pytest.mark.multiprocess
def test_model_checkpoint_every_n_steps_is_never_jumped_over(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        devices=2,
        max_steps=13,
        strategy=lp.PicardStrategy(window_size=4, threshold=1.0, start_method="fork"),
        **quiet_trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint]),
    )
    trainer.fit(ToyRegression(), regression_data())
    saved = sorted(int(p.stem.split("=")[1]) for p in tmp_path.glob("step=*.ckpt"))
    assert saved == [3, 6, 9, 12]
    state = torch.load(tmp_path / "step=6.ckpt", weights_only=False)
    assert state["global_step"] == 6
    picard = state["loops"]["fit_loop"]["epoch_loop.state_dict"]["picard"]
    assert len(picard["rows"]) == 5 and picard["rounds"] >= 2


def test_max_steps_is_honoured_exactly_and_global_step_counts_steps():
    trainer = pl.Trainer(
        devices=1,
        max_steps=7,
        strategy=lp.PicardStrategy(window_size=4, threshold=1.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(ToyRegression(step_lr=False), regression_data())
    assert trainer.global_step == 7
    assert trainer.callback_metrics["picard/rounds"].item() == 2, "4 + 3 steps with every guess accepted"


def test_epochs_end_at_the_data_and_continue(tmp_path):
    module = ToyRegression(step_lr=False)
    trainer = pl.Trainer(
        devices=1,
        max_epochs=3,
        strategy=lp.PicardStrategy(window_size=3, threshold=1.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data(n=40, batch_size=4))
    assert trainer.global_step == 30 and trainer.current_epoch == 3
    assert sorted({s for s, _ in module.seen_steps}) == list(range(30))
    assert all(s % 10 == b for s, b in module.seen_steps), "batch_idx restarts every epoch"


def test_validation_runs_at_its_interval(tmp_path):
    class WithValidation(ToyRegression):
        def __init__(self):
            super().__init__(step_lr=False)
            self.validated_at = []

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.validated_at.append(self.global_step)

    module = WithValidation()
    trainer = pl.Trainer(
        devices=1,
        max_steps=16,
        val_check_interval=5,
        strategy=lp.PicardStrategy(window_size=4, threshold=1.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data(), val_dataloaders=regression_data(n=8))
    assert module.validated_at == [5, 10, 15]


def test_progress_bar_shows_converged_steps(capsys):
    trainer = pl.Trainer(
        devices=1,
        max_steps=8,
        strategy=lp.PicardStrategy(window_size=4, threshold=1.0),
        **quiet_trainer_kwargs(enable_progress_bar=True),
    )
    trainer.fit(ToyRegression(step_lr=False), regression_data())
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "8/8" in shown, "converged steps τ over max_steps"
    assert "picard/steps_per" in shown and "4.0" in shown


def test_step_generator_is_seeded_per_step():
    class UsesGenerator(ToyRegression):
        def __init__(self):
            super().__init__(step_lr=False)
            self.draws = {}

        def training_step(self, batch, batch_idx):
            self.draws.setdefault(self.global_step, []).append(
                torch.rand((), generator=lp.step_generator()).item()
            )
            return super().training_step(batch, batch_idx)

    module = UsesGenerator()
    trainer = pl.Trainer(
        devices=1,
        max_steps=6,
        strategy=lp.PicardStrategy(window_size=3, threshold=0.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    assert all(len(set(v)) == 1 for v in module.draws.values()), "re-evaluations of a step draw the same"
    assert len({v[0] for v in module.draws.values()}) == 6


def test_a_second_fit_on_the_same_trainer_trains_the_new_module():
    trainer = pl.Trainer(
        devices=1,
        max_steps=4,
        strategy=lp.PicardStrategy(window_size=2, threshold=0.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(ToyRegression(hidden=8), regression_data())
    wider = ToyRegression(hidden=32)
    before = [p.detach().clone() for p in wider.parameters()]
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(wider, regression_data())
    assert trainer.global_step == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, wider.parameters()))
