"""The training-epoch loop that runs Picard rounds; the only module that touches Lightning's private API.

One ``advance`` is one Picard round: buffer the batches of steps τ … τ+n−1, evaluate this rank's slots,
gather, replay, slide. ``global_step`` is τ, the number of converged steps, so ``max_steps``,
``ModelCheckpoint(every_n_train_steps=…)``, the progress bar and the loggers count optimizer steps, not rounds.
The Lightning pieces used here are listed in :data:`PRIVATE_API` and checked by a contract test.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loops.fetchers import _DataFetcher, _DataLoaderIterDataFetcher
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lightning_picard import rng
from lightning_picard.convergence import aggregate_errors
from lightning_picard.errors import PicardRankError, PicardReplicaError
from lightning_picard.hooks import picard_parameters, run_after_optimizer_step
from lightning_picard.window import Resize, RoundResult

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
        self._logged: dict[int, list[tuple[str, Any, int]]] = {}

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
        loaders = self.trainer.fit_loop._combined_loader.flattened
        resumable = all(isinstance(loader, _Stateful) for loader in loaders)
        if self.restarting and not resumable and self.batch_progress.current.ready > 0:
            # Lightning restarts a plain dataloader at the epoch's first batch: skip the steps already done,
            # so that step s gets batch s as in the uninterrupted run.
            self._resume_skip = self.batch_progress.current.ready

    @override
    def advance(self, data_fetcher: _DataFetcher) -> None:
        if self.restarting and self._should_check_val_fx(data_fetcher):
            # As Lightning's own loop after a checkpoint written during validation: finish it, or skip it.
            if self.val_loop.restarted_mid_evaluation:
                return
            if self.restarted_on_last:
                self._skip_next_val = True
                return
            self.val_loop.increment_progress_to_evaluation_end()
        self.val_loop.restarting = False

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
        self._fill(data_fetcher, limit, first_batch_idx)
        if not self._batches:
            raise StopIteration
        n = min(limit, len(self._batches))

        batch = self._batches[0]
        trainer._logger_connector.on_batch_start(batch)
        call._call_callback_hooks(trainer, "on_train_batch_start", batch, first_batch_idx)
        response = call._call_lightning_module_hook(trainer, "on_train_batch_start", batch, first_batch_idx)
        call._call_strategy_hook(trainer, "on_train_batch_start", batch, first_batch_idx)
        if response == -1:
            self._skip_rest_of_epoch()

        if not self._fingerprint_checked:
            self._check_same_batches(n, tau)
        self._check_parameters_unchanged()
        with trainer.profiler.profile("picard_evaluate_slots"):
            outputs, failure = self._evaluate_slots(n, tau, first_batch_idx)
        with trainer.profiler.profile("picard_gather"):
            gathered = self.strategy.gather_rows(self._local_rows, out=self._gathered)
        header = _STATUS_COLUMNS + self.strategy.flat.header
        head = _integers(gathered[:, :header]).tolist()  # one host read per round: status and presence flags
        self._raise_if_a_rank_failed(head, failure, tau)
        _raise_if_replicas_differ(head, tau, self.strategy.slots_per_rank)
        rows = [self.strategy.gathered_row(j) for j in range(n)]
        nonfinite = [j for j in range(n) if head[rows[j]][_NONFINITE]]
        if nonfinite and nonfinite[0] > 0:
            n = nonfinite[0]  # a guess with a non-finite gradient is not on the true trajectory
        stops = [j for j in range(n) if head[rows[j]][_STOP]]
        if stops:
            n = stops[0] + 1  # training stops after the step that asked for it, if that step is accepted
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
        self._apply_logged(skip)
        self._log_round(result, len(nonfinite))
        if stops and skip == n:
            trainer.should_stop = True
        outputs = self._round_outputs(outputs)

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

    def _skip_rest_of_epoch(self) -> None:
        """``on_train_batch_start`` returned -1: end the epoch as Lightning does, the batch counted but not run."""
        self.batch_progress.increment_ready()
        self.batch_progress.increment_by(0, is_last_batch=True)
        self.batch_progress.increment_processed()
        self.update_lr_schedulers("step", update_plateau_schedulers=False)
        if self._num_ready_batches_reached():
            self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
        self._batches.clear()
        raise StopIteration

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
        """Slots this round: the window size, cut at the end of the epoch and so that the window never jumps over
        a step where something must happen (max_steps, a ModelCheckpoint every_n_train_steps multiple, a
        validation check)."""
        trainer = self.trainer
        limit = self.strategy.window_size
        batches = trainer.num_training_batches
        if batches != float("inf"):
            limit = min(limit, int(batches) - first_batch_idx)  # a window never spans two epochs
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

    def _fill(self, data_fetcher: _DataFetcher, n: int, first_batch_idx: int) -> None:
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
            if batch is None:
                raise MisconfigurationException(
                    f"The train dataloader yielded None at batch {first_batch_idx + len(self._batches)}. "
                    "PicardStrategy evaluates every step, so every batch must be data (Lightning would skip a None "
                    "batch without an optimizer step). Filter the None batches out in the dataset or collate_fn."
                )
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0)
            self._batches.append(batch)

    def _evaluate_slots(
        self, n: int, tau: int, first_batch_idx: int
    ) -> tuple[dict[int, Any], BaseException | None]:
        """Gradients of this rank's slots into its local rows.

        Returns this rank's slot outputs by slot and the exception that stopped the evaluation, if any: an
        exception is recorded in the rows' status columns so that every rank learns of it at the gather.
        """
        trainer = self.trainer
        strategy = self.strategy
        window, flat = strategy.window, strategy.flat
        row_length = _STATUS_COLUMNS + flat.header + max(window.slot_numel(j) for j in range(n))
        if self._local_rows is None or self._local_rows.shape[1] != row_length:
            self._gathered, self._local_rows = strategy.new_gather_buffer(row_length, flat.flat)
        status = _integers(self._local_rows[:, :_STATUS_COLUMNS])
        status.zero_()
        status[:, _CHECKSUM : _CHECKSUM + _CHECKSUM_COLUMNS] = _checksum(window.guess(0))
        optimizer = trainer.optimizers[0]
        results = trainer._results
        outputs: dict[int, Any] = {}
        self._logged = {}
        for j in strategy.owned_slots(n):
            window.load(j)
            step, batch_idx = tau + j, first_batch_idx + j
            row = self._local_rows[strategy.local_row(j)]
            self._evaluating_step = step
            stop_before = trainer.should_stop
            results.batch, results.batch_size = self._batches[j], None  # for the batch size of self.log
            self._logged[j] = logged = []
            try:
                with (
                    rng.step_rng(strategy.seed, step),
                    strategy.slot_evaluation(),
                    _recording(results, logged),
                ):
                    kwargs = self._build_kwargs(OrderedDict(), self._batches[j], batch_idx)
                    step_output = call._call_strategy_hook(trainer, "training_step", *kwargs.values())
                    strategy.post_training_step()
                    result = ClosureResult.from_training_step_output(
                        step_output, trainer.accumulate_grad_batches
                    )
                    # As Lightning: on_before_zero_grad, zero_grad, then backward unless training_step returned
                    # None (a step with no update: every gradient is None; the optimizer step and schedulers run).
                    call._call_callback_hooks(trainer, "on_before_zero_grad", optimizer)
                    call._call_lightning_module_hook(trainer, "on_before_zero_grad", optimizer)
                    call._call_lightning_module_hook(
                        trainer, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer
                    )
                    if result.closure_loss is not None:
                        call._call_strategy_hook(trainer, "backward", result.closure_loss, optimizer)
                    else:
                        _warnings.warn(
                            "`training_step` returned `None`. If this was on purpose, ignore this warning..."
                        )
                    window.check_step_outputs(j, step)
            except Exception as error:
                status[strategy.local_row(j), _FAILED_SLOT] = j + 1
                error.picard_step = step  # type: ignore[attr-defined]
                window.load(0)
                results.batch = self._batches[0]
                return outputs, error
            finally:
                self._evaluating_step = None
            if trainer.should_stop and not stop_before:
                status[strategy.local_row(j), _STOP] = 1  # honoured only if this step is accepted
                trainer.should_stop = stop_before
            gradient = row[_STATUS_COLUMNS : _STATUS_COLUMNS + flat.row_length]
            flat.write_gradients(gradient)
            status[strategy.local_row(j), _NONFINITE] = _has_nonfinite(gradient[flat.header :])
            if window.buffers is not None and window.buffers.outputs:
                window.buffers.write_outputs(row[_STATUS_COLUMNS + flat.row_length :])
            outputs[j] = result.asdict() if result.closure_loss is not None else {}
            # Drop the graph before the next slot: its leaf nodes remember the parameters' shapes, and the
            # next slot's guess may have other shapes (a module that changes dimensions).
            del step_output, result
        window.load(0)
        results.batch = self._batches[0]
        return outputs, None

    def _apply_logged(self, skip: int) -> None:
        """Let the values ``self.log`` recorded at this rank's accepted slots reach Lightning's results, in step
        order, so that epoch aggregates hold exactly the accepted steps (speculative ones are evaluated again).

        Step-level values stay those of this rank's first accepted step (step τ on rank 0, the logged step).
        """
        results = self.trainer._results
        stepped: set[str] = set()
        with self.strategy.slot_evaluation():  # a logged step was computed on one rank: sync_dist is per step
            for j in sorted(j for j in self._logged if j < skip):
                for key, value, batch_size in self._logged[j]:
                    metric = results[key]
                    if metric.meta.on_step and key in stepped:
                        if not metric.meta.on_epoch:
                            continue
                        cache = metric._forward_cache
                        results.update_metrics(key, value, batch_size)
                        metric._forward_cache = cache
                    else:
                        results.update_metrics(key, value, batch_size)
                        stepped.add(key)
        self._logged = {}

    def _round_outputs(self, outputs: dict[int, Any]) -> Any:
        """What ``on_train_batch_end`` receives: the output of step τ, on every rank (sent by rank 0)."""
        strategy = self.strategy
        if strategy.world_size == 1:
            return outputs.get(0)
        local = apply_to_collection(outputs.get(0), torch.Tensor, lambda t: t.detach().cpu())
        shared = strategy.broadcast(local, src=0)
        return apply_to_collection(shared, torch.Tensor, lambda t: t.to(strategy.root_device))

    def _raise_if_a_rank_failed(self, head: list[list[int]], failure: BaseException | None, tau: int) -> None:
        """If any rank's evaluation raised, every rank raises a :class:`PicardRankError` naming rank and step."""
        strategy = self.strategy
        failed = [
            (tau + row[_FAILED_SLOT] - 1, index // strategy.slots_per_rank)
            for index, row in enumerate(head)
            if row[_FAILED_SLOT]
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
        local = fingerprint.reshape(1, -1).to(self.strategy.root_device)
        gathered = self.strategy.gather_rows(local).cpu().reshape(self.trainer.world_size, n, -1)
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
        current = [p for p in picard_parameters(module) if self.strategy.is_picard_parameter(p)]
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
            stepped = self._batches_that_stepped
            self._batches_that_stepped = tau  # Lightning's default step, next to its `epoch` metric
            try:
                connector.log_metrics(connector.metrics["log"])
            finally:
                self._batches_that_stepped = stepped

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


_warnings = WarningCache()  # Lightning's own warnings, once each
_FAILED_SLOT = 0  # slot + 1 of the evaluation that raised on this rank, 0 if none
_NONFINITE = 1  # 1 if the slot's gradient has a NaN or inf
_STOP = 2  # 1 if the slot's training_step set trainer.should_stop
_CHECKSUM = 3  # the anchor's checksum in 15-bit pieces, the same in every row of a rank
_CHECKSUM_COLUMNS = 3
_STATUS_COLUMNS = 6  # at the start of each gathered row, before the presence flags and the gradients
_INTEGER_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _integers(values: torch.Tensor) -> torch.Tensor:
    """``values`` viewed as integers of the same width: the status columns hold exact integers in any dtype."""
    return values.view(_INTEGER_VIEW[values.element_size()])


def _checksum(anchor: torch.Tensor) -> torch.Tensor:
    """A checksum of the anchor's bits as ``_CHECKSUM_COLUMNS`` integers below 2**15, on the device."""
    total = _integers(anchor).sum(dtype=torch.int64)
    shifts = torch.arange(_CHECKSUM_COLUMNS, device=anchor.device, dtype=torch.int64) * 15
    return (total >> shifts) & 0x7FFF


def _raise_if_replicas_differ(head: list[list[int]], tau: int, slots_per_rank: int) -> None:
    """Every rank holds the same anchor bit for bit; raise on every rank (they all read ``head``) if not."""
    columns = slice(_CHECKSUM, _CHECKSUM + _CHECKSUM_COLUMNS)
    reference = head[0][columns]
    for index in range(0, len(head), slots_per_rank):
        if head[index][columns] != reference:
            raise PicardReplicaError(index // slots_per_rank, tau)


@contextmanager
def _recording(results: Any, logged: list[tuple[str, Any, int]]) -> Iterator[None]:
    """Record the ``self.log`` updates of one slot in ``logged`` instead of applying them to ``results``."""

    def record(key: str, value: Any, batch_size: int) -> None:
        logged.append((key, value.clone() if isinstance(value, torch.Tensor) else value, batch_size))

    results.update_metrics = record  # shadows the method during this slot only
    try:
        yield
    finally:
        del results.update_metrics


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
