"""The training-epoch loop that runs Picard rounds; the only module that touches Lightning's private API.

One ``advance`` is one Picard round: buffer the batches of steps τ … τ+n−1, evaluate this rank's slots,
gather, replay, slide. ``global_step`` is τ, the number of converged steps, so ``max_steps``,
``ModelCheckpoint(every_n_train_steps=…)``, the progress bar and the loggers count optimizer steps, not rounds.
The Lightning pieces used here are listed in :data:`PRIVATE_API` and checked by a contract test.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loops.fetchers import _DataFetcher, _DataLoaderIterDataFetcher
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lightning_picard import rng
from lightning_picard.errors import PicardRankError
from lightning_picard.hooks import picard_parameters, run_after_optimizer_step
from lightning_picard.picard import Resize, RoundResult, aggregate_errors

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_picard.strategy import PicardStrategy

PRIVATE_API: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
    ("lightning.pytorch.loops.fetchers", "_DataFetcher"),
    ("lightning.pytorch.loops.fetchers", "_DataLoaderIterDataFetcher"),
    ("lightning.pytorch.loops.optimization.automatic", "ClosureResult"),
    ("lightning.pytorch.trainer.call", "_call_strategy_hook"),
    ("lightning.pytorch.trainer.call", "_call_callback_hooks"),
    ("lightning.pytorch.trainer.call", "_call_lightning_module_hook"),
    ("lightning.fabric.utilities.types", "_Stateful"),
)
"""(module, name) pairs of private Lightning API this module relies on."""


def check_trainer_supported(trainer: pl.Trainer) -> None:
    """Raise for Trainer settings Picard cannot honour; switch off the distributed sampler.

    Every rank must see the same sequence of batches, so no ``DistributedSampler`` is injected.
    """
    if trainer.accumulate_grad_batches != 1 or any(
        isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks
    ):
        raise MisconfigurationException(
            "PicardStrategy does not support gradient accumulation (accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}). Use a larger batch instead: each Picard slot is one optimizer "
            "step."
        )
    trainer._accelerator_connector.use_distributed_sampler = False


def install_picard_loop(trainer: pl.Trainer) -> None:
    """Replace the trainer's training-epoch loop with a :class:`PicardEpochLoop` (once)."""
    current = trainer.fit_loop.epoch_loop
    if isinstance(current, PicardEpochLoop):  # a second fit on the same Trainer: the module may differ
        current._local_rows = None
        current._gathered = None
        current._fingerprint_checked = False
        return
    loop = PicardEpochLoop(trainer, min_steps=current.min_steps, max_steps=current.max_steps)
    loop.val_loop = current.val_loop  # it already holds the validation data attached by `fit`
    trainer.fit_loop.epoch_loop = loop


class PicardEpochLoop(_TrainingEpochLoop):
    """A training-epoch loop whose every iteration is one Picard round of the trainer's PicardStrategy."""

    def __init__(self, trainer: pl.Trainer, min_steps: int | None = None, max_steps: int = -1) -> None:
        super().__init__(trainer, min_steps=min_steps, max_steps=max_steps)
        self._batches: list[Any] = []
        self._exhausted = False
        self._evaluating_step: int | None = None
        self._local_rows: torch.Tensor | None = None
        self._gathered: torch.Tensor | None = None
        self._resume_skip = 0
        self._fingerprint_checked = False

    @property
    def strategy(self) -> PicardStrategy:
        return self.trainer.strategy  # type: ignore[return-value]

    @property
    @override
    def global_step(self) -> int:
        """τ, or the step being evaluated or replayed while a slot is in flight."""
        if self._evaluating_step is not None:
            return self._evaluating_step
        return super().global_step

    @override
    def reset(self) -> None:
        super().reset()
        self._batches.clear()
        self._exhausted = False

    @override
    def on_run_start(self, data_fetcher: _DataFetcher) -> None:
        super().on_run_start(data_fetcher)
        batches = self.trainer.num_training_batches
        window_size = self.strategy.window_size
        if batches != float("inf") and batches < window_size:
            raise MisconfigurationException(
                f"The train dataloader has {batches} batches per epoch but PicardStrategy(window_size={window_size}): "
                "a window never spans two epochs, so rounds could never fill their slots. Use a dataloader with "
                "at least window_size batches (for example a step-indexed dataset of length max_steps) or a "
                "smaller window_size."
            )
        loaders = self.trainer.fit_loop._combined_loader.flattened
        resumable = all(isinstance(loader, _Stateful) for loader in loaders)
        if self.restarting and not resumable and self.batch_progress.current.ready > 0:
            # Lightning restarts a plain dataloader at the epoch's first batch: skip the steps already done,
            # so that step s gets batch s as in the uninterrupted run.
            self._resume_skip = self.batch_progress.current.ready

    @override
    def advance(self, data_fetcher: _DataFetcher) -> None:
        if isinstance(data_fetcher, _DataLoaderIterDataFetcher):
            raise MisconfigurationException(
                "PicardStrategy needs the batch of each step; a training_step taking `dataloader_iter` is not "
                "supported. Take `batch` (and `batch_idx`) instead."
            )
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and self.trainer.world_size > 1
        ):
            self._broadcast_sigterm_tensor()

        trainer = self.trainer
        tau = self.global_step
        first_batch_idx = self.batch_idx + 1
        limit = self._window_limit(tau, first_batch_idx)
        self._fill(data_fetcher, limit)
        if not self._batches:
            raise StopIteration
        n = min(limit, len(self._batches))

        batch = self._batches[0]
        trainer._logger_connector.on_batch_start(batch)
        call._call_callback_hooks(trainer, "on_train_batch_start", batch, first_batch_idx)
        response = call._call_lightning_module_hook(trainer, "on_train_batch_start", batch, first_batch_idx)
        call._call_strategy_hook(trainer, "on_train_batch_start", batch, first_batch_idx)
        if response == -1:
            self.batch_progress.increment_by(0, is_last_batch=True)
            raise StopIteration

        if not self._fingerprint_checked:
            self._check_same_batches(n, tau)
        self._check_parameters_unchanged()
        with trainer.profiler.profile("picard_evaluate_slots"):
            outputs, failure = self._evaluate_slots(n, tau, first_batch_idx)
        with trainer.profiler.profile("picard_gather"):
            gathered = self.strategy.gather_rows(self._local_rows, out=self._gathered)
        header = _STATUS_COLUMNS + self.strategy.flat.header
        head = gathered[:, :header].tolist()  # host read after the gather: slot status and presence flags
        self._raise_if_a_rank_failed(head, failure)
        rows = [self.strategy.gathered_row(j) for j in range(n)]
        nonfinite = [j for j in range(n) if head[rows[j]][_NONFINITE]]
        if nonfinite and nonfinite[0] > 0:
            n = nonfinite[0]  # a guess with a non-finite gradient is not on the true trajectory
        with trainer.profiler.profile("picard_replay"):
            result = self.strategy.window.run_round(
                tau,
                n,
                gradient_row=lambda j: gathered[rows[j], _STATUS_COLUMNS:],
                apply_update=lambda j: self._apply_update(tau + j, first_batch_idx + j),
                snapshot=self.strategy.snapshot,
                presence=[[bool(v) for v in head[rows[j]][_STATUS_COLUMNS:]] for j in range(n)],
                extrapolate_update=lambda j: self._apply_update(
                    tau + j, first_batch_idx + j, step_hook=False
                ),
            )
        skip = result.skip
        del self._batches[:skip]
        self._count_steps(skip)
        self._log_round(result, len(nonfinite))

        if self._num_ready_batches_reached():
            self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
        # As after a sequential step: the parent's on_advance_end (or a resume) adds the last one.
        self._batches_that_stepped = tau + skip - 1
        last_batch_idx = first_batch_idx + skip - 1
        call._call_callback_hooks(trainer, "on_train_batch_end", outputs, batch, last_batch_idx)
        call._call_lightning_module_hook(trainer, "on_train_batch_end", outputs, batch, last_batch_idx)
        trainer._logger_connector.on_batch_end()
        self.batch_progress.increment_completed()
        self._send_to_loggers(tau, skip)

    def _count_steps(self, skip: int) -> None:
        """Advance Lightning's progress counters by ``skip`` steps, leaving the last batch not yet completed.

        This is the state a sequential step is in during ``on_train_batch_end``, where checkpoints are written,
        so Picard and sequential checkpoints resume the same way.
        """
        self.batch_progress.increment_by(skip, is_last_batch=self._exhausted and not self._batches)
        self.batch_progress.total.completed -= 1
        self.batch_progress.current.completed -= 1
        optimization = self.automatic_optimization.optim_progress.optimizer
        optimization.step.increment_by(skip)
        optimization.zero_grad.increment_by(skip)
        self.scheduler_progress.increment_by(skip * len(self.trainer.lr_scheduler_configs))

    def _window_limit(self, tau: int, first_batch_idx: int) -> int:
        """Slots this round: the window size, cut so the window never jumps over a step where something
        must happen (max_steps, a ModelCheckpoint every_n_train_steps multiple, a validation check)."""
        trainer = self.trainer
        limit = self.strategy.window_size
        if self.max_steps >= 0:
            limit = min(limit, self.max_steps - tau)
        for checkpoint in trainer.checkpoint_callbacks:
            every = getattr(checkpoint, "_every_n_train_steps", 0) or 0
            if every > 0:
                limit = min(limit, every - tau % every)
        val_every = trainer.val_check_batch
        if trainer.enable_validation and isinstance(val_every, int) and val_every > 0:
            done = (
                first_batch_idx if trainer.check_val_every_n_epoch is not None else self.total_batch_idx + 1
            )
            limit = min(limit, val_every - done % val_every)
        return max(limit, 1)

    def _fill(self, data_fetcher: _DataFetcher, n: int) -> None:
        """Buffer batches until ``n`` steps are available or the epoch's data is exhausted."""
        trainer = self.trainer
        if self._resume_skip:
            skip, self._resume_skip = self._resume_skip, 0
            data_fetcher.fetched -= skip
            for _ in range(skip):
                next(data_fetcher)
        while len(self._batches) < n and not self._exhausted:
            try:
                batch, _, __ = next(data_fetcher)
            except StopIteration:
                self._exhausted = True
                break
            self._exhausted = data_fetcher.done
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0)
            self._batches.append(batch)

    def _evaluate_slots(self, n: int, tau: int, first_batch_idx: int) -> tuple[Any, BaseException | None]:
        """Gradients of this rank's slots into its local rows.

        Returns the last evaluated slot's output and the exception that stopped the evaluation, if any: an
        exception is recorded in the rows' status column so that every rank learns of it at the gather.
        """
        trainer = self.trainer
        strategy = self.strategy
        window, flat = strategy.window, strategy.flat
        row_length = _STATUS_COLUMNS + flat.header + max(window.slot_numel(j) for j in range(n))
        if self._local_rows is None or self._local_rows.shape[1] != row_length:
            self._gathered, self._local_rows = strategy.new_gather_buffer(row_length, flat.flat)
        self._local_rows[:, :_STATUS_COLUMNS] = 0
        optimizer = trainer.optimizers[0]
        output: Any = None
        for j in strategy.owned_slots(n):
            window.load(j)
            step, batch_idx = tau + j, first_batch_idx + j
            row = self._local_rows[strategy.local_row(j)]
            self._evaluating_step = step
            try:
                with rng.step_rng(strategy.seed, step):
                    kwargs = self._build_kwargs(OrderedDict(), self._batches[j], batch_idx)
                    step_output = call._call_strategy_hook(trainer, "training_step", *kwargs.values())
                    strategy.post_training_step()
                    result = ClosureResult.from_training_step_output(
                        step_output, trainer.accumulate_grad_batches
                    )
                    if result.closure_loss is None:
                        raise MisconfigurationException(
                            f"training_step returned no loss at step {step}. PicardStrategy needs a loss at every "
                            "step: return a tensor or a dict with a 'loss' key (skipping steps is not supported)."
                        )
                    call._call_lightning_module_hook(
                        trainer, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer
                    )
                    call._call_strategy_hook(trainer, "backward", result.closure_loss, optimizer)
                    window.check_step_outputs(j, step)
            except Exception as error:
                row[_FAILED_STEP] = step + 1
                error.picard_step = step  # type: ignore[attr-defined]
                window.load(0)
                return output, error
            finally:
                self._evaluating_step = None
            gradient = row[_STATUS_COLUMNS : _STATUS_COLUMNS + flat.row_length]
            flat.write_gradients(gradient)
            row[_NONFINITE] = _has_nonfinite(gradient[flat.header :])
            if window.buffers is not None and window.buffers.outputs:
                window.buffers.write_outputs(row[_STATUS_COLUMNS + flat.row_length :])
            output = result.asdict()
            # Drop the graph before the next slot: its leaf nodes remember the parameters' shapes, and the
            # next slot's guess may have other shapes (a module that changes dimensions).
            del step_output, result
        window.load(0)
        return output, None

    def _raise_if_a_rank_failed(self, head: list[list[float]], failure: BaseException | None) -> None:
        """If any rank's evaluation raised, every rank raises a :class:`PicardRankError` naming rank and step."""
        strategy = self.strategy
        failed = [
            (int(row[_FAILED_STEP]) - 1, index // strategy.slots_per_rank)
            for index, row in enumerate(head)
            if row[_FAILED_STEP]
        ]
        if not failed:
            return
        step, rank = min(failed)
        description = f"{type(failure).__name__}: {failure}" if failure is not None else None
        if strategy.world_size > 1:
            description = strategy.broadcast(description, src=rank)
        if failure is not None and strategy.global_rank == rank:
            if strategy.world_size > 1:
                failure.add_note(
                    f"Picard: raised on rank {rank} while evaluating step {step}; all ranks stopped."
                )
            raise failure
        raise PicardRankError(rank, step, description)

    def _check_same_batches(self, n: int, tau: int) -> None:
        """Compare a cheap fingerprint of the first window's batches across ranks."""
        self._fingerprint_checked = True
        if self.trainer.world_size == 1:
            return
        fingerprint = torch.tensor([_fingerprint(batch) for batch in self._batches[:n]], dtype=torch.float64)
        gathered = self.strategy.all_gather(fingerprint.to(self.strategy.root_device)).cpu()
        for rank in range(1, gathered.shape[0]):
            if not torch.equal(gathered[rank], gathered[0]):
                index = int((gathered[rank] != gathered[0]).any(dim=-1).nonzero()[0])
                raise MisconfigurationException(
                    f"The train dataloader gives rank {rank} a different batch than rank 0 at step {tau + index}. "
                    "PicardStrategy needs the same batch sequence on every rank: do not shard the data by rank, "
                    "give a shuffling DataLoader a seeded generator, and draw per-step randomness inside "
                    "training_step rather than in the dataset or collate_fn."
                )

    def _check_parameters_unchanged(self, storage: bool = True) -> None:
        """Raise if the module's Picard parameters are not the objects (or, with ``storage``, the buffer) we hold."""
        flat = self.strategy.flat
        module = self.trainer.lightning_module
        current = picard_parameters(module)
        if len(current) != len(flat.params) or any(a is not b for a, b in zip(current, flat.params)):
            raise MisconfigurationException(
                "The module's trainable parameters changed during fit (a parameter was added, replaced or had "
                "requires_grad switched). PicardStrategy keeps a fixed set of parameters: create every parameter "
                "before fit, and freeze with requires_grad_(False) before fit if you need to. To change a "
                "parameter's number of rows, assign `param.data = new_rows` in picard_after_optimizer_step and "
                "return {name: parents} (see 'Writing a Picard-ready LightningModule')."
            )
        if not storage:
            return
        flat_storage = flat.flat.untyped_storage().data_ptr()
        if any(p.untyped_storage().data_ptr() != flat_storage for p in flat.params):
            raise MisconfigurationException(
                "A parameter's storage was replaced during fit (e.g. `param.data = new_tensor`) outside "
                "picard_after_optimizer_step. Update parameters in place (`param.data.copy_(...)`, "
                "`with torch.no_grad(): param.copy_(...)`)."
            )

    def _apply_update(self, step: int, batch_idx: int, step_hook: bool = True) -> Resize | None:
        """The user's optimizer step (with clipping and hooks), step-interval schedulers and (with ``step_hook``)
        the module's step hook for ``step``; returns the hook's resize report."""
        trainer = self.trainer
        module = trainer.lightning_module
        self._evaluating_step = step
        try:
            call._call_lightning_module_hook(
                trainer,
                "optimizer_step",
                trainer.current_epoch,
                batch_idx,
                module.optimizers(use_pl_optimizer=True),
                _gradients_already_loaded,
            )
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step" and (batch_idx + 1) % config.frequency == 0:
                    call._call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)
            self._evaluating_step = step + 1  # as in a sequential run, after the optimizer step
            report = run_after_optimizer_step(module, self.strategy.seed, step) if step_hook else None
        finally:
            self._evaluating_step = None
        if (
            step_hook and self.strategy.window.resizable
        ):  # the step hook ran: it must have kept the parameters
            self._check_parameters_unchanged(storage=False)
        return report

    def _log_round(self, result: RoundResult, nonfinite: int) -> None:
        module = self.trainer.lightning_module
        window = self.strategy.window
        finite = [e for e in result.errors if math.isfinite(e)]
        converged = result.window_start + result.skip
        metrics = {
            "picard/skip": float(result.skip),
            "picard/rounds": float(window.rounds),
            "picard/threshold": result.threshold,
            "picard/error_median": aggregate_errors(result.errors, "median"),
            "picard/error_max": max(finite) if finite else math.nan,
            "picard/window_start": float(result.window_start),
            "picard/nonfinite": float(nonfinite),
        }
        previous = module._current_fx_name
        module._current_fx_name = "training_step"
        try:
            module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
            module.log(
                "picard/steps_per_round",
                converged / max(window.rounds, 1),
                on_step=True,
                on_epoch=False,
                batch_size=1,
                prog_bar=True,
            )
        finally:
            module._current_fx_name = previous

    def _send_to_loggers(self, tau: int, skip: int) -> None:
        """Log at step τ when this round completed a step that Lightning would have logged."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        crossed = every > 0 and (tau + skip) // every > tau // every
        if crossed or trainer.should_stop or trainer.fast_dev_run:
            connector = trainer._logger_connector
            connector.log_metrics(connector.metrics["log"], step=tau)

    @override
    def on_save_checkpoint(self) -> dict:
        state = super().on_save_checkpoint()
        window = getattr(self.strategy, "window", None)
        if window is not None:
            state["picard"] = window.state_dict()
        return state

    @override
    def on_load_checkpoint(self, state_dict: dict) -> None:
        super().on_load_checkpoint(state_dict)
        window = getattr(self.strategy, "window", None)
        if window is not None and "picard" in state_dict:
            rank_zero_info(f"Picard resume: {window.load_state_dict(state_dict['picard'])}.")


_STATUS_COLUMNS = 2  # at the start of each gathered row, before the presence flags and the gradients
_FAILED_STEP = 0  # step + 1 of the evaluation that raised on this rank, 0 if none
_NONFINITE = 1  # 1 if the slot's gradient has a NaN or inf


def _fingerprint(batch: Any) -> list[float]:
    """Sum and sum of squares (float64) over every tensor in a batch."""
    total = [0.0, 0.0]

    def visit(tensor: torch.Tensor) -> None:
        values = tensor.detach().to(torch.float64)
        total[0] += values.sum().item()
        total[1] += values.square().sum().item()

    apply_to_collection(batch, torch.Tensor, visit)
    return total


def _has_nonfinite(values: torch.Tensor) -> torch.Tensor:
    """Whether ``values`` holds a NaN or an infinity, on the device, without a ``values``-sized temporary."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)  # NaN propagates to both, ±inf to one of them
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _gradients_already_loaded() -> None:
    """The closure handed to ``optimizer.step`` during replay: the gradients were loaded by the window."""
    return None
