"""Issue: robust Picard runs — exact resume, fail fast on any rank, non-finite gradients, bad input."""

import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

import lightning_picard as lp
from tests.toy import (
    LAUNCH_ENVIRONMENT,
    ToyRegression,
    final_parameters,
    quiet_trainer_kwargs,
    regression_data,
)

STEPS = 15


def _trainer(tmp_path, devices=2, window_size=4, threshold=0.0, max_steps=STEPS, callbacks=(), **kwargs):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    if devices == 0:
        strategy = "auto"
        devices = 1
        callbacks = [*callbacks, lp.StepSeed(0)]
    else:
        strategy = lp.PicardStrategy(
            window_size=window_size, threshold=threshold, start_method="fork" if devices > 1 else "popen"
        )
    return pl.Trainer(
        devices=devices,
        max_steps=max_steps,
        strategy=strategy,
        **quiet_trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint, *callbacks], **kwargs),
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("threshold", [0.0, 1e-4])
def test_resume_mid_epoch_is_bit_identical_to_the_uninterrupted_run(tmp_path, threshold):
    full = ToyRegression()
    _trainer(tmp_path / "full", threshold=threshold).fit(full, regression_data())
    resumed = ToyRegression()
    _trainer(tmp_path / "resumed", threshold=threshold).fit(
        resumed, regression_data(), ckpt_path=tmp_path / "full" / "step=5.ckpt"
    )
    assert torch.equal(final_parameters(resumed), final_parameters(full))
    saved = torch.load(tmp_path / "full" / "step=10.ckpt", weights_only=False)
    picard = saved["loops"]["fit_loop"]["epoch_loop.state_dict"]["picard"]
    assert set(picard) >= {"rows", "threshold", "rounds"}
    assert len(picard["rows"]) == 5 and set(picard["rows"][0]) == {"values", "layout", "buffers", "lineage"}
    assert saved["optimizer_states"][0]["state"], "the anchor's optimizer state is in the checkpoint"


def test_a_picard_checkpoint_continues_sequentially_and_vice_versa(tmp_path):
    # Epochs of 5 batches: step 5 is an epoch boundary, where a plain Lightning resume is exact too.
    def data():
        return regression_data(n=20)

    sequential = ToyRegression()
    _trainer(tmp_path / "seq", devices=0).fit(sequential, data())

    picard_then_sequential = ToyRegression()
    _trainer(tmp_path / "p", devices=1, max_steps=5).fit(ToyRegression(), data())
    _trainer(tmp_path / "ps", devices=0).fit(
        picard_then_sequential, data(), ckpt_path=tmp_path / "p" / "step=5.ckpt"
    )
    assert torch.equal(final_parameters(picard_then_sequential), final_parameters(sequential))

    sequential_then_picard = ToyRegression()
    _trainer(tmp_path / "sp", devices=1).fit(
        sequential_then_picard, data(), ckpt_path=tmp_path / "seq" / "step=5.ckpt"
    )
    assert torch.equal(final_parameters(sequential_then_picard), final_parameters(sequential))


def test_resuming_with_another_window_size_reinitialises_the_guesses(tmp_path, caplog):
    reference = ToyRegression()
    _trainer(tmp_path / "a", devices=1, window_size=4).fit(reference, regression_data())
    resumed = ToyRegression()
    with caplog.at_level("INFO"):
        _trainer(tmp_path / "b", devices=1, window_size=3).fit(
            resumed, regression_data(), ckpt_path=tmp_path / "a" / "step=5.ckpt"
        )
    assert "re-initialised from the anchor" in caplog.text
    assert torch.equal(final_parameters(resumed), final_parameters(reference)), "threshold 0 stays exact"


class FailsOnRankOne(ToyRegression):
    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step >= 5:
            self.marker.write_text(str(self.global_step))
            raise ValueError("bad render")
        return super().training_step(batch, batch_idx)


@pytest.mark.multiprocess
def test_an_exception_on_one_rank_stops_every_rank_and_names_rank_and_step(tmp_path):
    marker = tmp_path / "failed_step"
    start = time.monotonic()
    with pytest.raises(Exception, match="bad render") as error:
        _trainer(tmp_path, devices=2, window_size=4, max_steps=40).fit(
            FailsOnRankOne(marker), regression_data()
        )
    assert time.monotonic() - start < 60
    # The launcher reports whichever process ended first: rank 1's own error or rank 0's PicardRankError.
    assert re.search(f"rank 1 (failed )?while evaluating step {marker.read_text()}", str(error.value))
    time.sleep(0.5)
    assert multiprocessing.active_children() == []


class NonFiniteGuess(ToyRegression):
    """The gradient is NaN at one speculative guess: never at the anchor of a round."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        bad = self.trainer.strategy.window is not None and not torch.equal(
            self.trainer.strategy.flat.flat, self.trainer.strategy.window.guess(0)
        )
        if bad and self.global_step == 6:
            loss = loss * math.nan
        return loss


def test_a_non_finite_gradient_at_a_guess_cuts_the_window_and_stays_exact(tmp_path):
    reference = ToyRegression()
    pl.Trainer(devices=1, max_steps=10, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs()).fit(
        reference, regression_data()
    )
    module = NonFiniteGuess()
    trainer = pl.Trainer(
        devices=1,
        max_steps=10,
        strategy=lp.PicardStrategy(window_size=4, threshold=0.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    assert torch.isfinite(final_parameters(module)).all()
    assert torch.equal(final_parameters(module), final_parameters(reference))


class RankShardedData(ToyRegression):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.global_rank)
        x = torch.randn(64, 4, generator=generator)
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=4)


@pytest.mark.multiprocess
def test_batches_that_differ_across_ranks_are_refused(tmp_path):
    trainer = _trainer(tmp_path, devices=2)
    with pytest.raises(Exception, match="different batch than rank 0 at step 0"):
        trainer.fit(RankShardedData())


class ReplacesParameter(ToyRegression):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            self.net[0].weight = torch.nn.Parameter(self.net[0].weight.detach().clone())
        return super().training_step(batch, batch_idx)


def test_parameters_that_change_during_fit_are_refused(tmp_path):
    with pytest.raises(MisconfigurationException, match="trainable parameters changed during fit"):
        _trainer(tmp_path, devices=1).fit(ReplacesParameter(), regression_data())


class InterruptedDuringReplay(ToyRegression):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.global_step == 7:
            raise KeyboardInterrupt
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_ctrl_c_during_a_round_leaves_the_last_converged_state(tmp_path):
    module = InterruptedDuringReplay()
    trainer = pl.Trainer(
        devices=1,
        max_steps=20,
        strategy=lp.PicardStrategy(window_size=4, threshold=0.0),
        **quiet_trainer_kwargs(),
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
            trainer.fit(module, regression_data())
    finally:
        signal.signal(signal.SIGINT, handler)
    assert trainer.interrupted
    tau = trainer.global_step
    assert 4 <= tau <= 7
    reference = ToyRegression()
    sequential = pl.Trainer(devices=1, max_steps=tau, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs())
    sequential.fit(reference, regression_data())
    assert torch.equal(final_parameters(module), final_parameters(reference))
    state, expected = module.optimizers().optimizer.state, reference.optimizers().optimizer.state
    for p, q in zip(module.parameters(), reference.parameters()):
        assert torch.equal(state[p]["exp_avg"], expected[q]["exp_avg"])
        assert state[p]["step"].item() == tau


@pytest.mark.multiprocess
def test_the_launching_process_raises_the_named_error_with_the_default_launcher(tmp_path):
    """`python train.py` with strategy="picard": rank 0 is the user's process; rank 1 a subprocess."""
    script = Path(__file__).parent / "scripts" / "fail_on_rank_one.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in ("MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert re.search(
        r"PicardRankError: Picard: rank 1 failed while evaluating step \d+: ValueError: bad render",
        result.stderr,
    )
    leftover = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert leftover == []


def test_a_single_rank_fit_leaves_no_launcher_environment_behind():
    """A later fork-based fit would otherwise think its processes were launched externally (and with
    OMP_NUM_THREADS left set, forked children may deadlock in OpenMP)."""
    launcher = LAUNCH_ENVIRONMENT
    before = {key: os.environ.get(key) for key in launcher}
    trainer = pl.Trainer(
        devices=1, max_steps=2, strategy=lp.PicardStrategy(window_size=2), **quiet_trainer_kwargs()
    )
    trainer.fit(ToyRegression(), regression_data())
    assert {key: os.environ.get(key) for key in launcher} == before


@pytest.mark.multiprocess
@pytest.mark.parametrize(("devices", "threads"), [(1, None), (2, "2")])
def test_picard_fork_after_multithreaded_work_in_the_same_process_does_not_hang(devices, threads):
    """OpenMP is not fork-safe: one rank runs in the launching process, forked ranks use one thread."""
    script = Path(__file__).parent / "scripts" / "fork_after_threads.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in LAUNCH_ENVIRONMENT:
        env.pop(key, None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads  # Lightning then leaves the forked ranks' thread count alone
    try:
        result = subprocess.run(
            [sys.executable, str(script), str(devices)], capture_output=True, text=True, timeout=90, env=env
        )
    finally:
        leftover = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
        for pid in leftover:
            os.kill(int(pid), signal.SIGKILL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout


@pytest.mark.multiprocess
def test_sigterm_on_any_rank_stops_every_rank_at_the_same_step_without_a_collective_of_its_own(tmp_path):
    """A real SIGTERM on rank 1 only: its flag travels in the next round's gathered status (Lightning's handler
    broadcasts instead, which no Picard rank would match), and both ranks stop there, at the same step."""
    script = Path(__file__).parent / "scripts" / "sigterm_on_rank_one.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in ("MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    stopped = {path.name: path.read_text().split() for path in tmp_path.glob("rank*")}
    assert set(stopped) == {"rank0", "rank1"}, (stopped, result.stderr[-3000:])
    assert stopped["rank0"] == stopped["rank1"], stopped
    exception, step = stopped["rank0"]
    assert exception == "SIGTERMException" and 6 <= int(step) < 40, stopped
    leftover = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert leftover == []
