"""The private Lightning pieces lightning_picard.loop relies on still exist (lightning>=2.6,<2.7)."""

import importlib

import lightning.pytorch as pl
import pytest

from lightning_picard import strategy
from lightning_picard.loop import PRIVATE_API, PicardEpochLoop


@pytest.mark.parametrize(("module", "name"), PRIVATE_API + strategy.PRIVATE_API)
def test_private_names_exist(module, name):
    assert hasattr(importlib.import_module(module), name)


def test_loop_and_trainer_internals_used_by_the_picard_loop():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=3)
    loop = PicardEpochLoop(trainer, max_steps=3)
    for attribute in (
        "batch_progress",
        "automatic_optimization",
        "_batches_that_stepped",
        "_build_kwargs",
        "_broadcast_sigterm_tensor",
        "_num_ready_batches_reached",
        "update_lr_schedulers",
        "val_loop",
        "restarting",
        "restarted_on_last",
        "_should_check_val_fx",
        "_skip_next_val",
    ):
        assert hasattr(loop, attribute), attribute
    for attribute in ("restarted_mid_evaluation", "increment_progress_to_evaluation_end", "restarting"):
        assert hasattr(loop.val_loop, attribute), attribute
    assert hasattr(loop.automatic_optimization.optim_progress.optimizer.step, "increment_by")
    assert hasattr(loop.batch_progress, "increment_by")
    connector = trainer._logger_connector
    for attribute in ("on_batch_start", "on_batch_end", "log_metrics", "metrics"):
        assert hasattr(type(connector), attribute), attribute
    assert hasattr(loop, "_results") and callable(loop._results.update_metrics), "recorded per slot"
    assert hasattr(trainer._accelerator_connector, "use_distributed_sampler")
    assert hasattr(trainer.fit_loop, "epoch_loop")
    assert isinstance(trainer.fit_loop.epoch_loop, type(loop).__mro__[1])


def test_strategy_hooks_overridden_by_picard_exist():
    from lightning.pytorch.strategies import DDPStrategy

    for name in (
        "_configure_launcher",
        "setup_distributed",
        "configure_ddp",
        "teardown",
        "setup_environment",
    ):
        assert callable(getattr(DDPStrategy, name, None)), name
    assert hasattr(DDPStrategy(), "_layer_sync"), "sync_batchnorm is refused through it"
    assert hasattr(DDPStrategy(), "_launcher"), "one rank runs without a launcher"


def test_result_metric_internals_used_to_apply_accepted_steps():
    from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric

    metric = _ResultMetric(_Metadata(fx="training_step", name="x", on_step=True), is_tensor=True)
    assert hasattr(metric, "_forward_cache") and hasattr(metric.meta, "on_epoch")
