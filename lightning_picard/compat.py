"""Every private Lightning name lightning_picard uses, in one place (``lightning>=2.6,<2.7``).

Private API may change in any Lightning release. The plugin reaches it only through this module: the classes and
functions below under public names, and small accessors for the private attributes it reads or sets.
:data:`PRIVATE_API` lists each of them, and tests/test_lightning_contract.py checks the whole list against the
installed Lightning, so an upgrade that breaks one fails there, by name, instead of deep inside a fit.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lightning.fabric.strategies.registry import _StrategyRegistry as StrategyRegistry
from lightning.fabric.utilities.types import _Stateful as Stateful
from lightning.pytorch.loops.fetchers import _DataFetcher as DataFetcher
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher as DataLoaderIterDataFetcher
from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop as TrainingEpochLoop
from lightning.pytorch.trainer.call import _call_callback_hooks as call_callback_hooks
from lightning.pytorch.trainer.call import _call_lightning_module_hook as call_lightning_module_hook
from lightning.pytorch.trainer.call import _call_strategy_hook as call_strategy_hook
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

if TYPE_CHECKING:
    import lightning.pytorch as pl

PRIVATE_API: tuple[tuple[str, str], ...] = (
    # imported under a public name here
    ("lightning.fabric.strategies.registry", "_StrategyRegistry"),
    ("lightning.fabric.utilities.types", "_Stateful"),
    ("lightning.pytorch.loops.fetchers", "_DataFetcher"),
    ("lightning.pytorch.loops.fetchers", "_DataLoaderIterDataFetcher"),
    ("lightning.pytorch.loops.optimization.automatic", "ClosureResult"),
    ("lightning.pytorch.loops.optimization.automatic", "Closure"),
    ("lightning.pytorch.loops.optimization.automatic.Closure", "warning_cache"),
    ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
    ("lightning.pytorch.trainer.call", "_call_callback_hooks"),
    ("lightning.pytorch.trainer.call", "_call_lightning_module_hook"),
    ("lightning.pytorch.trainer.call", "_call_strategy_hook"),
    ("lightning.pytorch.trainer.connectors.signal_connector", "_HandlersCompose"),
    # attributes read or set through the accessors below
    ("lightning.pytorch.Trainer", "_results"),
    ("lightning.pytorch.Trainer", "_logger_connector"),
    ("lightning.pytorch.Trainer", "_accelerator_connector.use_distributed_sampler"),
    ("lightning.pytorch.Trainer", "fit_loop._combined_loader"),
    ("lightning.pytorch.Trainer", "_signal_connector.received_sigterm"),
    ("lightning.pytorch.Trainer", "_signal_connector._sigterm_notifier_fn"),
    ("lightning.pytorch.trainer.connectors.signal_connector._HandlersCompose", "signal_handlers"),
    ("lightning.pytorch.LightningModule", "_current_fx_name"),
    ("lightning.pytorch.LightningModule", "_on_before_batch_transfer"),
    ("lightning.pytorch.trainer.connectors.logger_connector.result._ResultCollection", "update_metrics"),
    ("lightning.pytorch.trainer.connectors.logger_connector.result._ResultMetric", "_forward_cache"),
    # inherited by PicardEpochLoop from _TrainingEpochLoop and used there
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_batches_that_stepped"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_build_kwargs"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_num_ready_batches_reached"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_should_check_val_fx"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_skip_next_val"),
    # overridden or set by PicardStrategy, read by PicardRichProgressBar
    ("lightning.pytorch.strategies.DDPStrategy", "_configure_launcher"),
    ("lightning.pytorch.strategies.DDPStrategy", "_launcher"),
    ("lightning.pytorch.strategies.DDPStrategy", "_start_method"),
    ("lightning.pytorch.strategies.DDPStrategy", "_layer_sync"),
    ("lightning.pytorch.callbacks.RichProgressBar", "_get_train_description"),
)
"""``(where, attribute path)`` of every private Lightning name the plugin uses; ``where`` is a module, or a class
whose instances (a default-constructed one, or the class itself) carry the attribute."""


def set_received_sigterm(trainer: pl.Trainer, received: bool) -> None:
    """Set what ``trainer.received_sigterm`` reads."""
    trainer._signal_connector.received_sigterm = received


def replace_sigterm_notifier(trainer: pl.Trainer, notifier: Callable[[int, Any], None]) -> bool:
    """Put ``notifier`` in place of Lightning's SIGTERM notifier in the handler Lightning registered for this fit
    (its other handlers stay); returns whether it was found. Only in the main thread, where handlers live."""
    current = signal.getsignal(signal.SIGTERM)
    if not isinstance(current, _HandlersCompose):
        return False
    lightning_notifier = trainer._signal_connector._sigterm_notifier_fn
    handlers = current.signal_handlers
    found = [i for i, handler in enumerate(handlers) if handler == lightning_notifier]
    for i in found:
        handlers[i] = notifier
    return bool(found)


def training_results(trainer: pl.Trainer) -> Any:
    """The fit loop's ``_ResultCollection``: what ``self.log`` in ``training_step`` writes to."""
    return trainer._results


def logger_connector(trainer: pl.Trainer) -> Any:
    """The trainer's logger connector (batch start/end bookkeeping, ``log_metrics``)."""
    return trainer._logger_connector


def disable_distributed_sampler(trainer: pl.Trainer) -> None:
    """Stop Lightning from sharding the training data by rank: every Picard rank needs every batch."""
    trainer._accelerator_connector.use_distributed_sampler = False


def train_dataloaders(trainer: pl.Trainer) -> list[Any]:
    """The fit's training dataloaders, flattened."""
    return trainer.fit_loop._combined_loader.flattened


def before_batch_transfer(module: pl.LightningModule, batch: Any) -> Any:
    """``on_before_batch_transfer`` as Lightning's loop calls it."""
    return module._on_before_batch_transfer(batch, dataloader_idx=0)


def current_hook(module: pl.LightningModule) -> str | None:
    """The name of the hook the module is running (what ``self.log`` files values under)."""
    return getattr(module, "_current_fx_name", None)


@contextmanager
def logging_from(module: pl.LightningModule, hook: str) -> Iterator[None]:
    """Let the strategy call ``self.log`` as if from ``hook``."""
    previous = module._current_fx_name
    module._current_fx_name = hook
    try:
        yield
    finally:
        module._current_fx_name = previous


@contextmanager
def recording_updates(results: Any, record: Any) -> Iterator[None]:
    """Route ``results.update_metrics(key, value, batch_size)`` to ``record`` while the block runs."""
    results.update_metrics = record  # shadows the method on this instance only
    try:
        yield
    finally:
        del results.update_metrics


def update_metric(results: Any, key: str, value: Any, batch_size: int, keep_step_value: bool = False) -> None:
    """``results.update_metrics``; with ``keep_step_value`` the metric's step-level value stays the earlier one."""
    if not keep_step_value:
        results.update_metrics(key, value, batch_size)
        return
    metric = results[key]
    cache = metric._forward_cache
    results.update_metrics(key, value, batch_size)
    metric._forward_cache = cache


def warn_training_step_returned_none() -> None:
    """Lightning's warning for a ``training_step`` that returned ``None``, from Lightning's own once-only cache (so
    clearing that cache, as Lightning's tests do, makes it warn again)."""
    Closure.warning_cache.warn(
        "`training_step` returned `None`. If this was on purpose, ignore this warning..."
    )


__all__ = [
    "PRIVATE_API",
    "ClosureResult",
    "DataFetcher",
    "DataLoaderIterDataFetcher",
    "Stateful",
    "StrategyRegistry",
    "TrainingEpochLoop",
    "before_batch_transfer",
    "call_callback_hooks",
    "call_lightning_module_hook",
    "call_strategy_hook",
    "current_hook",
    "disable_distributed_sampler",
    "logger_connector",
    "logging_from",
    "recording_updates",
    "replace_sigterm_notifier",
    "set_received_sigterm",
    "train_dataloaders",
    "training_results",
    "update_metric",
    "warn_training_step_returned_none",
]
