"""Lightning's own behaviour under PicardStrategy: each test compares a Picard run with the plain Lightning run."""

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import lightning_picard as lp
from tests.toy import ToyRegression, final_parameters, quiet_trainer_kwargs, regression_data


def _fit(
    module, devices=0, window_size=3, threshold=0.0, data=None, val=None, round_metrics=True, **trainer_kwargs
):
    """devices=0: the sequential reference (one device, StepSeed); else Picard on that many ranks."""
    if devices == 0:
        strategy, devices = "auto", 1
        trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), lp.StepSeed(0)]
    else:
        strategy = lp.PicardStrategy(
            window_size=window_size,
            threshold=threshold,
            start_method="fork" if devices > 1 else "popen",
            timeout=timedelta(seconds=60),
            log_round_metrics=round_metrics,
        )
    trainer_kwargs.setdefault("max_steps", 12)
    trainer = pl.Trainer(devices=devices, strategy=strategy, **quiet_trainer_kwargs(**trainer_kwargs))
    trainer.fit(module, data if data is not None else regression_data(), val_dataloaders=val)
    return trainer


class StopsAtBatchFour(ToyRegression):
    def training_step(self, batch, batch_idx):
        if batch_idx == 4:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_should_stop_set_in_training_step_stops_after_that_step(threshold):
    """A speculative slot that sets the flag must not stop training; the accepted step does, after its update."""
    reference = StopsAtBatchFour()
    sequential = _fit(reference, max_steps=-1, max_epochs=1)
    module = StopsAtBatchFour()
    trainer = _fit(module, devices=1, window_size=4, threshold=threshold, max_steps=-1, max_epochs=1)
    assert trainer.global_step == sequential.global_step == 5
    assert trainer.current_epoch == sequential.current_epoch == 1
    if threshold == 0.0:
        assert torch.equal(final_parameters(module), final_parameters(reference))


class EpochScheduled(ToyRegression):
    def __init__(self, skip_at):
        super().__init__(step_lr=False)
        self.skip_at = skip_at

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == self.skip_at else None

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)]


@pytest.mark.parametrize("skip_at", [0, 3, 4, 5, 8])
def test_on_train_batch_start_returning_minus_one_ends_the_epoch_as_lightning_does(skip_at):
    """The hook runs for each step before its first evaluation; with every guess accepted the rounds start at 0, 4,
    8, so -1 at 3 or 5 comes from a step that was to be a guess: the window is cut before it."""
    sequential = _fit(EpochScheduled(skip_at), max_steps=-1, max_epochs=3)
    trainer = _fit(
        EpochScheduled(skip_at), devices=1, window_size=4, threshold=1.0, max_steps=-1, max_epochs=3
    )
    assert trainer.fit_loop.batch_idx == sequential.fit_loop.batch_idx == skip_at
    assert trainer.global_step == sequential.global_step == 3 * skip_at
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == sequential.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**3)
    assert trainer.is_last_batch


class LogsStep(ToyRegression):
    def __init__(self, sync_dist=False):
        super().__init__()
        self.sync_dist = sync_dist

    def training_step(self, batch, batch_idx):
        step = torch.tensor(float(self.global_step))
        self.log("step_mean", step, on_step=False, on_epoch=True, sync_dist=self.sync_dist)
        self.log("step_sum", step, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=self.sync_dist)
        self.log("step_max", step, on_step=False, on_epoch=True, reduce_fx="max", sync_dist=self.sync_dist)
        self.log("ones", 1.0, on_step=True, on_epoch=True, reduce_fx="sum", sync_dist=self.sync_dist)
        return super().training_step(batch, batch_idx)


def _epoch_metrics(trainer):
    return {
        k: trainer.callback_metrics[k].item() for k in ("step_mean", "step_sum", "step_max", "ones_epoch")
    }


def test_epoch_aggregates_hold_only_accepted_steps():
    expected = _epoch_metrics(_fit(LogsStep(), max_steps=-1, max_epochs=1, data=regression_data(n=40)))
    assert expected == {"step_mean": 4.5, "step_sum": 45.0, "step_max": 9.0, "ones_epoch": 10.0}
    picard = _fit(
        LogsStep(), devices=1, window_size=4, max_steps=-1, max_epochs=1, data=regression_data(n=40)
    )
    assert _epoch_metrics(picard) == expected
    assert picard.callback_metrics["picard/rounds"].item() > 1


@pytest.mark.multiprocess
def test_sync_dist_on_two_ranks_sums_every_accepted_step_once():
    """self.log(..., sync_dist=True) in training_step: no collective per slot (ranks evaluate different numbers of
    slots), and the epoch value over both ranks is the sequential one."""
    expected = _epoch_metrics(_fit(LogsStep(), max_steps=-1, max_epochs=1, data=regression_data(n=40)))
    picard = _fit(
        LogsStep(sync_dist=True),
        devices=2,
        window_size=3,
        max_steps=-1,
        max_epochs=1,
        data=regression_data(n=40),
    )
    assert _epoch_metrics(picard) == expected


def test_logger_rows_carry_the_epoch_as_in_lightning(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    _fit(
        ToyRegression(),
        devices=1,
        window_size=2,
        max_steps=-1,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        data=regression_data(n=16),
    )
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = [row.split(",")[header.index("epoch")] for row in rows[1:]]
    assert epochs and all(epochs), "every row has Lightning's `epoch` column"
    assert {float(e) for e in epochs} == {0.0, 1.0}


class NoneBatches(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.zeros(4)


def test_a_dataloader_yielding_none_gets_a_clear_message():
    data = DataLoader(NoneBatches(), batch_size=4, collate_fn=lambda items: None)
    with pytest.raises(MisconfigurationException, match="yielded None at batch 0"):
        _fit(ToyRegression(), devices=1, data=data)


class GathersInTrainingStep(ToyRegression):
    def training_step(self, batch, batch_idx):
        self.all_gather(torch.ones(()))
        return super().training_step(batch, batch_idx)


@pytest.mark.multiprocess
def test_all_gather_while_a_step_is_evaluated_names_the_hook():
    with pytest.raises(Exception, match="all_gather was called in `training_step`"):
        _fit(GathersInTrainingStep(), devices=2)


class ReducesInTrainingStep(ToyRegression):
    def training_step(self, batch, batch_idx):
        self.trainer.strategy.barrier()
        total = self.trainer.strategy.reduce(torch.tensor(1.0), reduce_op="sum")
        self.log("reduced", total, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        return super().training_step(batch, batch_idx)


@pytest.mark.multiprocess
def test_reduce_and_barrier_while_a_step_is_evaluated_see_that_step_alone():
    """Ranks evaluate different numbers of slots: a collective per slot would hang; each step counts once."""
    trainer = _fit(ReducesInTrainingStep(), devices=2, window_size=3, max_steps=10)
    assert trainer.callback_metrics["reduced"].item() == 10.0, "one per step, as in the sequential run"


def test_sync_batchnorm_is_refused_at_setup():
    with pytest.raises(MisconfigurationException, match="does not support sync_batchnorm"):
        _fit(ToyRegression(), devices=1, sync_batchnorm=True)


@pytest.mark.parametrize(
    ("devices", "trainer_kwargs", "n"),
    [
        (1, {"limit_train_batches": 1}, 64),
        (1, {}, 8),
        (2, {}, 4),
    ],
)
def test_an_epoch_shorter_than_the_window_is_clipped_and_exact(devices, trainer_kwargs, n):
    """limit_train_batches=1, a 1- or 2-batch loader: the window is cut at the end of the epoch."""
    kwargs = dict(max_steps=-1, max_epochs=3, data=regression_data(n=n), **trainer_kwargs)
    reference = ToyRegression()
    sequential = _fit(reference, **kwargs)
    module = ToyRegression()
    trainer = _fit(module, devices=devices, window_size=4, **kwargs)
    assert torch.equal(final_parameters(module), final_parameters(reference))
    if devices == 1:
        assert trainer.global_step == sequential.global_step


@pytest.mark.multiprocess
def test_fast_dev_run_on_two_devices():
    module = ToyRegression()
    trainer = _fit(module, devices=2, window_size=2, max_steps=-1, fast_dev_run=True)
    reference = ToyRegression()
    _fit(reference, max_steps=1)
    assert torch.equal(final_parameters(module), final_parameters(reference))
    assert trainer.callback_metrics["picard/rounds"].item() == 1


class WithUnoptimizedLayer(ToyRegression):
    def __init__(self):
        super().__init__()
        self.side = torch.nn.Linear(4, 1)  # trainable, used in the loss, in no optimizer

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.1 * self.side(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


def test_trainable_parameters_in_no_optimizer_stay_fixed_as_in_lightning():
    reference = WithUnoptimizedLayer()
    side = reference.side.weight.detach().clone()
    _fit(reference)
    module = WithUnoptimizedLayer()
    _fit(module, devices=1, window_size=3)
    assert torch.equal(module.side.weight, side) and torch.equal(reference.side.weight, side)
    assert torch.equal(final_parameters(module), final_parameters(reference))


class SkipsSomeSteps(ToyRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if self.global_step % 3 == 1 else loss


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_a_training_step_returning_none_is_a_step_with_no_update(devices):
    reference = SkipsSomeSteps()
    _fit(reference)
    module = SkipsSomeSteps()
    trainer = _fit(module, devices=devices, window_size=3)
    assert torch.equal(final_parameters(module), final_parameters(reference))
    if devices == 1:
        assert trainer.global_step == 12


def test_a_training_step_returning_none_warns_through_lightnings_own_cache():
    """Lightning warns once per process; clearing its cache (as its tests do) makes the next fit warn again."""
    from lightning.pytorch.loops.optimization.automatic import Closure

    for _ in range(2):
        Closure.warning_cache.clear()
        with pytest.warns(UserWarning, match="training_step` returned `None"):
            _fit(SkipsSomeSteps(), devices=1, window_size=3)


class RecordsBatchHooks(Callback):
    """Every ``on_train_batch_start``/``end`` call: (hook, batch_idx, global_step, the output's loss)."""

    def __init__(self):
        self.calls = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(("start", batch_idx, trainer.global_step, None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone() if isinstance(outputs, dict) and "loss" in outputs else None
        self.calls.append(("end", batch_idx, trainer.global_step, loss))


def _hook_calls(recorder, hook):
    return [(batch_idx, step) for name, batch_idx, step, _ in recorder.calls if name == hook]


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_batch_hooks_run_once_per_step_with_lightnings_batch_idx_and_global_step(threshold):
    """Two epochs of 10 batches, window 4: each step's start hook once before it, its end hook once after it, with
    the sequential run's batch_idx and global_step; at threshold 0 each end hook gets that step's own loss."""
    kwargs = dict(max_steps=-1, max_epochs=2, data=regression_data(n=40))
    sequential, picard = RecordsBatchHooks(), RecordsBatchHooks()
    _fit(ToyRegression(), callbacks=[sequential], **kwargs)
    trainer = _fit(
        ToyRegression(), devices=1, window_size=4, threshold=threshold, callbacks=[picard], **kwargs
    )
    assert trainer.callback_metrics["picard/rounds"].item() < 20
    for hook in ("start", "end"):
        assert _hook_calls(picard, hook) == _hook_calls(sequential, hook), hook
    assert _hook_calls(picard, "start")[:3] == [(0, 0), (1, 1), (2, 2)]
    assert _hook_calls(picard, "end")[:3] == [(0, 1), (1, 2), (2, 3)]
    ends = [call for call in picard.calls if call[0] == "end"]
    reference = [call for call in sequential.calls if call[0] == "end"]
    if threshold == 0.0:
        assert all(torch.equal(a[3], b[3]) for a, b in zip(ends, reference))
    else:
        assert all(a[3] is not None for a in ends)


class LogsInBatchHooks(ToyRegression):
    def on_train_batch_start(self, batch, batch_idx):
        self.log("starts", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("ends", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("end_step", float(self.global_step), on_step=False, on_epoch=True, reduce_fx="max")


def test_values_logged_in_the_batch_hooks_count_each_step_once():
    trainer = _fit(LogsInBatchHooks(), devices=1, window_size=4, threshold=1.0, max_steps=-1, max_epochs=1)
    metrics = {key: trainer.callback_metrics[key].item() for key in ("starts", "ends", "end_step")}
    assert metrics == {"starts": 16.0, "ends": 16.0, "end_step": 16.0}


class CountsCheckpointCalls(pl.callbacks.ModelCheckpoint):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append((trainer.global_step, lp.at_round_end(trainer)))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_checkpoint_callbacks_see_the_step_of_the_state_they_save(tmp_path):
    """The module holds the round's end state in every end hook of the round: a checkpoint callback, called at
    every step, sees that state's global_step, so a checkpoint is labelled with the state it holds."""
    checkpoint = CountsCheckpointCalls(dirpath=tmp_path, train_time_interval=timedelta(0), save_top_k=-1)
    trainer = _fit(
        ToyRegression(),
        devices=1,
        window_size=4,
        threshold=1.0,
        max_steps=12,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    rounds = int(trainer.callback_metrics["picard/rounds"].item())
    assert len(checkpoint.ends) == 12 and all(at_end for _, at_end in checkpoint.ends)
    round_ends = sorted({step for step, _ in checkpoint.ends})
    assert len(round_ends) == rounds < 12
    saved = sorted(int(path.stem.split("step=")[1]) for path in tmp_path.glob("*.ckpt"))
    assert saved == round_ends
    for path in tmp_path.glob("*.ckpt"):
        assert torch.load(path, weights_only=False)["global_step"] == int(path.stem.split("step=")[1])


class ReturnsMore(ToyRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "step": torch.tensor(self.global_step)}


class RecordsOutputs(Callback):
    def __init__(self, folder):
        self.folder = folder
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(
            (trainer.global_step, float(outputs["loss"]), int(outputs["step"]) if "step" in outputs else None)
        )

    def on_train_end(self, trainer, pl_module):
        torch.save(self.seen, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.multiprocess
@pytest.mark.parametrize("module", [ToyRegression, ReturnsMore])
def test_every_rank_gets_every_accepted_steps_own_output(tmp_path, module):
    """Two ranks, window 3, threshold 0: each rank's end hook of step s gets step s's loss (and the rest of its
    output), whichever rank evaluated it."""
    reference = RecordsOutputs(tmp_path)
    _fit(module(), callbacks=[reference])
    _fit(module(), devices=2, window_size=3, callbacks=[RecordsOutputs(tmp_path)])
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == reference.seen


class RequiresOutputs(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not isinstance(outputs, dict) or not torch.is_tensor(outputs.get("loss")):
            raise AssertionError(f"rank {trainer.global_rank} got outputs={outputs!r}")


@pytest.mark.multiprocess
def test_every_rank_gets_the_output_of_step_tau_every_round():
    """Epochs of 4 batches, window 3, every guess accepted: rounds of 3 and 1 slots; rank 1 owns no slot in the
    second."""
    trainer = _fit(
        ToyRegression(),
        devices=2,
        window_size=3,
        threshold=1.0,
        max_steps=-1,
        max_epochs=2,
        data=regression_data(n=16),
        callbacks=[RequiresOutputs()],
    )
    assert trainer.callback_metrics["picard/rounds"].item() == 4


class DriftsOnRankOne(ToyRegression):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.global_rank == 1 and self.global_step == 4:
            with torch.no_grad():
                self.net[0].bias.add_(1e-6)  # a rank-local bug: the replicas' replays differ


@pytest.mark.multiprocess
def test_replicas_that_drift_apart_stop_every_rank_with_a_clear_error():
    with pytest.raises(Exception, match=r"the anchor \(step \d+\) of rank 1 differs from rank 0's"):
        _fit(DriftsOnRankOne(), devices=2, window_size=2, max_steps=12)


class FailsLateOnRankOne(ToyRegression):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step >= 513:
            raise ValueError("bad render")
        return super().training_step(batch, batch_idx)


@pytest.mark.multiprocess
def test_the_failed_step_is_named_exactly_under_bf16_true_past_its_integer_range():
    """bf16 holds integers exactly only up to 256 (514 would read as 512 or 516): the status columns are integer
    views holding the slot, not the step, so this holds in any dtype (16-true's 65,504 limit alike)."""
    with pytest.raises(Exception, match=r"rank 1 (failed )?while evaluating step 513\b"):
        _fit(
            FailsLateOnRankOne(),
            devices=2,
            window_size=2,
            threshold=1.0,
            max_steps=520,
            precision="bf16-true",
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_status_columns_hold_exact_integers_in_every_dtype(dtype):
    from lightning_picard.round import _checksum, _integers

    rows = torch.zeros(2, 8, dtype=dtype)
    status = _integers(rows[:, :6])
    status[:, 3:6] = _checksum(torch.randn(1000).to(dtype), 3)
    status[1, 0] = 32_000  # far beyond what float16 / bfloat16 hold exactly as values
    assert _integers(rows)[1, 0].item() == 32_000
    assert all(0 <= v < 2**15 for v in _integers(rows)[0, 3:6].tolist())
    changed = torch.randn(1000).to(dtype)
    assert not torch.equal(
        _checksum(changed, 3), _checksum(changed.clone().index_fill_(0, torch.tensor([7]), 0.5), 3)
    )


class WithValidation(ToyRegression):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.net(batch[0]) - batch[1]).square().mean())


def _progress(trainer):
    loop = trainer.fit_loop.epoch_loop
    return {
        "batch": loop.batch_progress.state_dict(),
        "val_batch": loop.val_loop.batch_progress.state_dict(),
        "optimizer_step": loop.automatic_optimization.optim_progress.state_dict(),
        "global_step": trainer.global_step,
    }


def test_resuming_from_a_checkpoint_written_in_validation_counts_progress_as_lightning(tmp_path):
    """The restart branch of Lightning's advance: validation is finished or skipped, not run twice."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    progress = {}
    for name, devices in (("sequential", 0), ("picard", 1)):
        kwargs = dict(
            devices=devices,
            window_size=3,
            val_check_interval=5,
            limit_val_batches=2,
            enable_checkpointing=True,
        )
        first = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, filename="{step}")
        _fit(WithValidation(), max_steps=7, callbacks=[first], val=regression_data(n=8), **kwargs)
        module = WithValidation()
        trainer = pl.Trainer(
            devices=1,
            max_steps=12,
            strategy=lp.PicardStrategy(window_size=3, threshold=0.0) if devices else "auto",
            **quiet_trainer_kwargs(val_check_interval=5, limit_val_batches=2),
        )
        trainer.fit(
            module,
            regression_data(),
            val_dataloaders=regression_data(n=8),
            ckpt_path=tmp_path / name / "step=5.ckpt",
        )
        progress[name] = _progress(trainer)
    assert progress["picard"] == progress["sequential"]


def test_step_seed_leaves_no_seeded_rng_behind_when_an_epoch_is_skipped():
    _fit(EpochScheduled(4), max_steps=-1, max_epochs=2)
    assert lp.current_step_seed() is None


class CountsZeroGrads(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.calls += 1


class RaisesBeforeZeroGrad(ToyRegression):
    def on_before_zero_grad(self, optimizer) -> None:
        if self.global_step == 2:
            raise RuntimeError("trouble before zero_grad")


def test_on_before_zero_grad_runs_for_every_evaluated_step_as_lightning_calls_it():
    """Lightning calls the hook (callbacks, then the module) before ``optimizer_zero_grad``; checkpoint-on-exception
    tests rely on it."""
    counter = CountsZeroGrads()
    _fit(ToyRegression(), devices=1, window_size=3, callbacks=[counter])
    assert counter.calls >= 12  # once per evaluated slot: every step at least once
    with pytest.raises(RuntimeError, match="trouble before zero_grad"):
        _fit(RaisesBeforeZeroGrad(), devices=1, window_size=3)


class FailsAtStepFive(ToyRegression):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("Trouble!")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("devices", "window_size", "steps"), [(1, 2, [5]), (1, 4, [3, 4, 5])])
def test_a_checkpoint_saved_on_an_exception_holds_the_steps_before_it(tmp_path, devices, window_size, steps):
    """Lightning's ModelCheckpoint(save_on_exception=True): under Picard the steps of the round before the failing
    one are replayed, and those that converge accepted, before the error is raised. With a window of 2 (the failing
    step right after the anchor) the checkpoint is the sequential one; a wider window may keep fewer steps (at
    threshold 0 only exact guesses are accepted), never wrong ones."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(folder, devices, window_size=1):
        checkpoint = ModelCheckpoint(dirpath=folder, filename="exception", save_on_exception=True)
        with pytest.raises(Exception, match="Trouble!"):
            _fit(
                FailsAtStepFive(),
                devices=devices,
                window_size=window_size,
                callbacks=[checkpoint],
                enable_checkpointing=True,
            )
        return torch.load(folder / "exception.ckpt", weights_only=False)

    saved = fit(tmp_path / "picard", devices, window_size)
    assert saved["global_step"] in steps
    if window_size == 2:
        expected = fit(tmp_path / "sequential", 0)
        assert expected["global_step"] == 5
        for name, value in expected["state_dict"].items():
            assert torch.equal(saved["state_dict"][name], value), name


class FailsBeforeStepFive(ToyRegression):
    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 5:
            raise RuntimeError("Trouble!")


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_an_exception_in_a_later_steps_start_hook_comes_after_the_steps_before_it(tmp_path, threshold):
    """on_train_batch_start of step 5 runs while step 4 is the anchor (window 4): as in a sequential run, steps 0-4
    are taken before its exception is raised, and the checkpoint written on it holds them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(folder, devices):
        checkpoint = ModelCheckpoint(dirpath=folder, filename="exception", save_on_exception=True)
        with pytest.raises(RuntimeError, match="Trouble!"):
            _fit(
                FailsBeforeStepFive(),
                devices=devices,
                window_size=4,
                threshold=threshold,
                callbacks=[checkpoint],
                enable_checkpointing=True,
            )
        return torch.load(folder / "exception.ckpt", weights_only=False)

    saved, expected = fit(tmp_path / "picard", 1), fit(tmp_path / "sequential", 0)
    assert saved["global_step"] == expected["global_step"] == 5
    if threshold == 0.0:
        for name, value in expected["state_dict"].items():
            assert torch.equal(saved["state_dict"][name], value), name


def test_the_picard_loop_is_the_loop_lightning_built():
    """Installing Picard keeps the epoch loop object (and whatever was attached to it, e.g. a patched method)."""
    trainer = pl.Trainer(
        devices=1,
        strategy=lp.PicardStrategy(window_size=2),
        **quiet_trainer_kwargs(max_steps=4),
    )
    loop = trainer.fit_loop.epoch_loop
    calls = []
    original = loop.update_lr_schedulers
    loop.update_lr_schedulers = lambda *a, **k: (calls.append(a), original(*a, **k))[1]
    trainer.fit(ToyRegression(), regression_data())
    assert trainer.fit_loop.epoch_loop is loop and type(loop).__name__ == "PicardEpochLoop"
    assert calls, "the method patched before fit was called"


class LogsEveryStepAndAtTrainStart(ToyRegression):
    def on_train_start(self):
        self.log("foo", 123.0)


class RowRecorder(pl.loggers.Logger):
    name, version = "rows", 0

    def __init__(self, keep_picard=False):
        super().__init__()
        self.rows = []
        self.keep_picard = keep_picard

    def log_metrics(self, metrics, step=None):
        keys = (k for k in metrics if self.keep_picard or not k.startswith("picard/"))
        self.rows.append((step, sorted(keys)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_logger_rows_are_lightnings_rows_plus_the_picard_keys():
    """A value logged in on_train_start gets a row of its own at step 0 beside the step's row, as in Lightning."""
    rows = {}
    for devices in (0, 1):
        logger = RowRecorder()
        _fit(
            LogsEveryStepAndAtTrainStart(),
            devices=devices,
            window_size=2,
            logger=logger,
            log_every_n_steps=1,
            max_steps=3,
            limit_train_batches=1,
            max_epochs=3,
        )
        rows[devices] = logger.rows
    assert rows[1] == rows[0]
    assert (0, ["epoch", "foo"]) in rows[0] and (0, ["epoch", "train_loss"]) in rows[0]


def test_without_round_metrics_the_logged_keys_are_the_sequential_runs():
    """log_round_metrics=False: the logger rows and the callback metrics hold exactly the sequential run's keys (a
    row is written per round, at its first step, so there are fewer rows)."""
    rows, metrics = {}, {}
    for devices in (0, 1):
        logger = RowRecorder(keep_picard=True)
        trainer = _fit(
            LogsInBatchHooks(),
            devices=devices,
            window_size=4,
            threshold=1.0,
            round_metrics=False,
            logger=logger,
            log_every_n_steps=2,
            max_steps=10,
        )
        rows[devices], metrics[devices] = logger.rows, sorted(trainer.callback_metrics)
    assert {tuple(keys) for _, keys in rows[1]} == {tuple(keys) for _, keys in rows[0]}
    assert metrics[1] == metrics[0] and not any(key.startswith("picard/") for key in metrics[1])
    with_metrics = _fit(LogsInBatchHooks(), devices=1, window_size=4, threshold=1.0, max_steps=10)
    assert "picard/rounds" in with_metrics.callback_metrics
