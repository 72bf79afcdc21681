"""The training-epoch loop that runs Picard rounds through Lightning's hooks.

One ``advance`` is one Picard round: buffer the batches of steps τ … τ+n−1, evaluate this rank's slots with
Lightning's ``training_step``/``backward`` hooks, and hand them to the strategy's :class:`~lightning_picard.round.
PicardRound`, which gathers, replays and slides. ``global_step`` is τ, the number of converged steps, so
``max_steps``, ``ModelCheckpoint(every_n_train_steps=…)``, the progress bar and the loggers count optimizer steps,
not rounds. Lightning's private pieces are reached through :mod:`lightning_picard.compat`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lightning_picard import compat, rng
from lightning_picard.compat import (
    ClosureResult,
    DataFetcher,
    DataLoaderIterDataFetcher,
    Stateful,
    TrainingEpochLoop,
    call_callback_hooks,
    call_lightning_module_hook,
    call_strategy_hook,
)
from lightning_picard.convergence import aggregate_errors
from lightning_picard.errors import PicardRankError
from lightning_picard.hooks import (
    check_training_step_slots,
    picard_parameters,
    run_after_optimizer_step,
    training_step_slots,
)
from lightning_picard.round import RoundStatus
from lightning_picard.slots import PicardSlot, slot_state
from lightning_picard.window import Resize, RoundResult

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_picard.strategy import PicardStrategy


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
    compat.disable_distributed_sampler(trainer)


def install_picard_loop(trainer: pl.Trainer) -> None:
    """Make the trainer's training-epoch loop a :class:`PicardEpochLoop` (once).

    The loop object stays the one Lightning built: its class changes, so its progress, its validation loop and
    anything a callback or test attached to it are kept, and references to it stay valid.
    """
    loop = trainer.fit_loop.epoch_loop
    if isinstance(loop, PicardEpochLoop):  # a second fit on the same Trainer: the module may differ
        loop._fingerprint_checked = False
        return
    loop.__class__ = PicardEpochLoop
    loop._init_picard_state()


class PicardEpochLoop(TrainingEpochLoop):
    """A training-epoch loop whose every iteration is one Picard round of the trainer's PicardStrategy."""

    def __init__(self, trainer: pl.Trainer, min_steps: int | None = None, max_steps: int = -1) -> None:
        super().__init__(trainer, min_steps=min_steps, max_steps=max_steps)
        self._init_picard_state()

    def _init_picard_state(self) -> None:
        self._batches: list[Any] = []
        self._exhausted = False
        self._evaluating_step: int | None = None
        self._resume_skip = 0
        self._fingerprint_checked = False
        self._logged: dict[int, list[tuple[str, Any, int]]] = {}
        self._started_until: int | None = None  # the first step whose on_train_batch_start has not run
        # The step whose on_train_batch_start returned -1 (None) or raised (the exception), and what to do there.
        self._stop_before: tuple[int, BaseException | None] | None = None

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
        self._started_until = self._stop_before = None

    @override
    def on_run_start(self, data_fetcher: DataFetcher) -> None:
        super().on_run_start(data_fetcher)
        if self.strategy.slots_per_rank > 1:  # else a rank never has two slots
            try:
                check_training_step_slots(self.trainer.lightning_module)
            except ValueError as error:
                raise MisconfigurationException(str(error)) from None
        if self.trainer.world_size > 1:
            compat.replace_sigterm_notifier(self.trainer, self._notice_sigterm)
        loaders = compat.train_dataloaders(self.trainer)
        resumable = all(isinstance(loader, Stateful) for loader in loaders)
        if self.restarting and not resumable and self.batch_progress.current.ready > 0:
            # Lightning restarts a plain dataloader at the epoch's first batch: skip the steps already done,
            # so that step s gets batch s as in the uninterrupted run.
            self._resume_skip = self.batch_progress.current.ready

    @override
    def advance(self, data_fetcher: DataFetcher) -> None:
        if self.restarting and self._should_check_val_fx(data_fetcher):
            # As Lightning's own loop after a checkpoint written during validation: finish it, or skip it.
            if self.val_loop.restarted_mid_evaluation:
                return
            if self.restarted_on_last:
                self._skip_next_val = True
                return
            self.val_loop.increment_progress_to_evaluation_end()
        self.val_loop.restarting = False

        if isinstance(data_fetcher, DataLoaderIterDataFetcher):
            raise MisconfigurationException(
                "PicardStrategy needs the batch of each step; a training_step taking `dataloader_iter` is not "
                "supported. Take `batch` (and `batch_idx`) instead."
            )
        trainer = self.trainer
        picard_round = self.strategy.round
        tau = self.global_step
        first_batch_idx = self.batch_idx + 1
        if self._stop_before is not None and self._stop_before[0] == tau:  # now the window's first step
            error, self._stop_before = self._stop_before[1], None
            if error is not None:
                raise error
            self._skip_rest_of_epoch()
        limit = self._window_limit(tau, first_batch_idx)
        self._fill(data_fetcher, limit, first_batch_idx)
        if not self._batches:
            raise StopIteration
        n = min(limit, len(self._batches))

        compat.logger_connector(trainer).on_batch_start(self._batches[0])
        call_strategy_hook(trainer, "on_train_batch_start", self._batches[0], first_batch_idx)
        n = self._start_steps(tau, n, first_batch_idx)

        if not self._fingerprint_checked:
            self._check_same_batches(n, tau)
        self._check_parameters_unchanged()
        with trainer.profiler.profile("picard_evaluate_slots"):
            outputs, failure = self._evaluate_slots(n, tau, first_batch_idx)
        with trainer.profiler.profile("picard_gather"):
            status = picard_round.gather(tau, n)
        if status.failed:
            self._accept_before_failure(status, outputs, tau, first_batch_idx)
            self._raise_if_a_rank_failed(status, failure)
        if status.sigterm:  # as Lightning's loop, where rank 0's flag is broadcast before every step
            raise SIGTERMException()
        n = status.accepted_limit(n)
        with trainer.profiler.profile("picard_replay"):
            result = self._replay(tau, n, status, first_batch_idx)
        skip = result.skip
        accepted = self._take_accepted(skip)
        if self.strategy.log_round_metrics:
            self._log_round(result, len(status.nonfinite))
        if status.stops and skip == n and status.stops[0] == n - 1:
            trainer.should_stop = True

        if self._num_ready_batches_reached():
            self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
        self._end_steps(tau, accepted, first_batch_idx, self._step_outputs(outputs, status, skip))
        self.batch_progress.increment_completed()
        self._send_to_loggers(tau, skip)

    def _start_steps(self, tau: int, n: int, first_batch_idx: int) -> int:
        """Run ``on_train_batch_start`` (callbacks, then the module) of the round's steps that have not had it: once
        per step, before the step's first evaluation, with ``global_step`` reading that step.

        Returns the slots to evaluate: ``n``, or fewer if the hook returned -1 or raised for a later step s. Then,
        as in a sequential run, the steps before s are taken first: the epoch ends (or the exception is raised) when
        s is the window's first step. For step τ that is now.
        """
        trainer = self.trainer
        results = compat.training_results(trainer)
        stepped = self._batches_that_stepped
        first = max(self._started_until or 0, tau)
        for step in range(first, tau + n):
            j = step - tau
            batch, batch_idx = self._batches[j], first_batch_idx + j
            self._evaluating_step = step
            self._batches_that_stepped = stepped + j
            results.batch, results.batch_size = batch, None
            try:
                call_callback_hooks(trainer, "on_train_batch_start", batch, batch_idx)
                response = call_lightning_module_hook(trainer, "on_train_batch_start", batch, batch_idx)
            except Exception as error:
                if j == 0:
                    raise
                self._stop_before, n = (step, error), j
                break
            finally:
                self._evaluating_step = None
                self._batches_that_stepped = stepped
            self._started_until = step + 1
            if response == -1:
                if j == 0:
                    self._skip_rest_of_epoch()
                self._stop_before, n = (step, None), j
                break
        results.batch, results.batch_size = self._batches[0], None
        return n

    def _end_steps(self, tau: int, batches: list[Any], first_batch_idx: int, outputs: list[Any]) -> None:
        """Run ``on_train_batch_end`` of each accepted step, with its batch and output, in step order.

        The module holds the round's end state (step τ + skip) in all of them. Callbacks and the module see
        ``global_step`` read the step after the hook's own; Lightning's checkpoint and early-stopping callbacks see
        τ + skip, the step of the state they save or compare, so a checkpoint written from any of them is labelled
        with the state it holds.
        """
        trainer = self.trainer
        results = compat.training_results(trainer)
        try:
            for j, (batch, output) in enumerate(zip(batches, outputs)):
                batch_idx = first_batch_idx + j
                # As after a sequential step (on_advance_end adds the round's last one).
                self._batches_that_stepped = tau + j
                results.batch, results.batch_size = batch, None
                self._evaluating_step = tau + j + 1
                call_callback_hooks(
                    trainer, "on_train_batch_end", output, batch, batch_idx, monitoring_callbacks=False
                )
                self._evaluating_step = None
                call_callback_hooks(
                    trainer, "on_train_batch_end", output, batch, batch_idx, monitoring_callbacks=True
                )
                self._evaluating_step = tau + j + 1
                call_lightning_module_hook(trainer, "on_train_batch_end", output, batch, batch_idx)
        finally:
            self._evaluating_step = None
        compat.logger_connector(trainer).on_batch_end()

    @override
    def on_advance_end(self, data_fetcher: DataFetcher) -> None:
        if self.trainer.world_size == 1 or not self.trainer.received_sigterm:
            super().on_advance_end(data_fetcher)
            return
        # Lightning stops the rank that received SIGTERM here, alone; under Picard the flag travels in the next
        # round's gathered status, so that every rank stops at the same step.
        compat.set_received_sigterm(self.trainer, False)
        try:
            super().on_advance_end(data_fetcher)
        finally:
            compat.set_received_sigterm(self.trainer, True)

    def _notice_sigterm(self, signum: int, frame: Any) -> None:
        """Lightning's SIGTERM notifier without its broadcast (which no other rank would match: the flag reaches
        them in the next round's gathered status instead)."""
        rank_zero_info(
            f"Received SIGTERM: {signum}; every rank stops after the gather of the next Picard round."
        )
        if not self.trainer.received_sigterm:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        compat.set_received_sigterm(self.trainer, True)

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
        if self._stop_before is not None:
            limit = min(limit, self._stop_before[0] - tau)
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

    def _fill(self, data_fetcher: DataFetcher, n: int, first_batch_idx: int) -> None:
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
            batch = compat.before_batch_transfer(trainer.lightning_module, batch)
            batch = call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0)
            self._batches.append(batch)

    def _evaluate_slots(
        self, n: int, tau: int, first_batch_idx: int
    ) -> tuple[dict[int, Any], BaseException | None]:
        """Evaluate this rank's slots and record each in the round.

        Returns this rank's slot outputs by slot and the exception of its earliest failing slot, if any: the round
        records every failure, so that every rank learns of them at the gather.
        """
        trainer = self.trainer
        picard_round = self.strategy.round
        optimizer = trainer.optimizers[0]
        results = compat.training_results(trainer)
        outputs: dict[int, Any] = {}
        failure: BaseException | None = None
        self._logged = {}
        slots = picard_round.begin(n, sigterm=self.strategy.world_size > 1 and trainer.received_sigterm)
        batched_error: BaseException | None = None
        if len(slots) > 1 and training_step_slots(trainer.lightning_module) is not None:
            batched_error = self._evaluate_batched(slots, tau, first_batch_idx, outputs)
            if batched_error is None:
                picard_round.load(0)
                results.batch = self._batches[0]
                return outputs, None
            self._logged = {}  # evaluated again one by one below: a step that fails fails as without the hook
        for j in slots:
            picard_round.load(j)
            step, batch_idx = tau + j, first_batch_idx + j
            self._evaluating_step = step
            stop_before = trainer.should_stop
            results.batch, results.batch_size = self._batches[j], None  # for the batch size of self.log
            self._logged[j] = logged = []
            try:
                with (
                    rng.step_rng(self.strategy.seed, step),
                    self.strategy.slot_evaluation(),
                    compat.recording_updates(results, _recorder(logged)),
                ):
                    kwargs = self._build_kwargs(OrderedDict(), self._batches[j], batch_idx)
                    step_output = call_strategy_hook(trainer, "training_step", *kwargs.values())
                    self.strategy.post_training_step()
                    result = ClosureResult.from_training_step_output(
                        step_output, trainer.accumulate_grad_batches
                    )
                    # As Lightning: on_before_zero_grad, zero_grad, then backward unless training_step returned
                    # None (a step with no update: every gradient is None; the optimizer step and schedulers run).
                    _zero_grad(trainer, optimizer, batch_idx)
                    if result.closure_loss is not None:
                        call_strategy_hook(trainer, "backward", result.closure_loss, optimizer)
                    else:
                        compat.warn_training_step_returned_none()
                    picard_round.window.check_step_outputs(j, step)
            except Exception as error:
                # Go on with the earlier slots (evaluated last first): the steps before a failure are still
                # accepted before it is raised. The earliest failure on this rank is the one reported.
                picard_round.record_failure(j)
                error.picard_step = step  # type: ignore[attr-defined]
                failure = error
                trainer.should_stop = stop_before
                continue
            finally:
                self._evaluating_step = None
            stop = trainer.should_stop and not stop_before
            trainer.should_stop = stop_before
            loss = result.loss if result.closure_loss is not None else None
            picard_round.record_slot(j, stop=stop, loss=loss, more=bool(result.extra))
            outputs[j] = result.asdict() if result.closure_loss is not None else {}
            # Drop the graph before the next slot: its leaf nodes remember the parameters' shapes, and the
            # next slot's guess may have other shapes (a module that changes dimensions).
            del step_output, result
        picard_round.load(0)
        results.batch = self._batches[0]
        if batched_error is not None and failure is None:
            failure = self._batched_hook_failed(batched_error, slots, tau)
        return outputs, failure

    def _evaluate_batched(
        self, slots: list[int], tau: int, first_batch_idx: int, outputs: dict[int, Any]
    ) -> BaseException | None:
        """Evaluate this rank's ``slots`` with the module's ``picard_training_step_slots`` and one backward, and
        record each slot in the round once all succeeded; returns the exception if anything raised (nothing is recorded
        then).

        Per slot, as in its one-by-one evaluation: ``on_before_zero_grad``, ``optimizer_zero_grad`` and
        ``on_before_backward`` (with the slot's loss) before the backward, and ``on_after_backward`` after it with
        the slot's guess loaded and its gradient in ``.grad``; each in the slot's step (``global_step``, seeded
        RNGs, ``self.log``, ``should_stop``).
        """
        trainer = self.trainer
        module = trainer.lightning_module
        picard_round = self.strategy.round
        window, flat = picard_round.window, picard_round.flat
        optimizer = trainer.optimizers[0]
        results = compat.training_results(trainer)
        stop_before = trainer.should_stop
        current: list[PicardSlot] = []

        @contextmanager
        def activate(slot: PicardSlot) -> Iterator[None]:
            if current:
                raise MisconfigurationException(
                    f"Slot {slot.index} (step {slot.step}) was entered inside slot {current[0].index}: enter one "
                    "slot at a time (`with slot:` blocks must not nest)."
                )
            current.append(slot)
            self._evaluating_step = slot.step
            results.batch, results.batch_size = slot.batch, None
            trainer.should_stop = stop_before
            try:
                yield
            finally:
                slot.stop = slot.stop or (trainer.should_stop and not stop_before)
                trainer.should_stop = stop_before
                self._evaluating_step = None
                current.clear()

        def record(key: str, value: Any, batch_size: int) -> None:
            if not current:
                raise MisconfigurationException(
                    f"self.log({key.split('.', 1)[-1]!r}) was called in picard_training_step_slots outside a slot: "
                    "log inside `with slot:`, so the value belongs to that slot's step."
                )
            self._logged[current[0].index].append(
                (key, value.clone() if isinstance(value, torch.Tensor) else value, batch_size)
            )

        batch: list[PicardSlot] = []
        for j in slots:
            values, layout, buffers = window.row_state(j)
            parameters, copies = slot_state(values, layout, flat.names, buffers)
            batch.append(
                PicardSlot(
                    j,
                    tau + j,
                    self._batches[j],
                    first_batch_idx + j,
                    self.strategy.seed,
                    module,
                    parameters,
                    copies,
                    activate,
                )
            )
            self._logged[j] = []
        try:
            with self.strategy.slot_evaluation(), compat.recording_updates(results, record):
                with (
                    trainer.precision_plugin.train_step_context(),
                    compat.logging_from(module, "training_step"),
                ):
                    step_outputs = list(training_step_slots(module)(list(batch)))  # type: ignore[misc]
                self.strategy.post_training_step()
                if len(step_outputs) != len(batch):
                    raise MisconfigurationException(
                        f"picard_training_step_slots returned {len(step_outputs)} outputs for {len(batch)} slots; "
                        "return one training_step output per slot, in the order of the slots given."
                    )
                if trainer.should_stop != stop_before:
                    raise MisconfigurationException(
                        "picard_training_step_slots set trainer.should_stop outside a slot: set it inside "
                        "`with slot:`, so that it belongs to that slot's step."
                    )
                closures = [
                    ClosureResult.from_training_step_output(output, trainer.accumulate_grad_batches)
                    for output in step_outputs
                ]
                for slot, result in zip(batch, closures):
                    with slot.step_context():
                        _zero_grad(trainer, optimizer, slot.batch_idx)
                        if result.closure_loss is not None:
                            call_callback_hooks(trainer, "on_before_backward", result.closure_loss)
                            call_lightning_module_hook(trainer, "on_before_backward", result.closure_loss)
                losses = [result.closure_loss for result in closures if result.closure_loss is not None]
                if losses:
                    # The slots' losses are independent: the gradient of their sum is each slot's own gradient.
                    total = sum(losses[1:], losses[0])
                    trainer.precision_plugin.backward(total, module, optimizer)
                del losses
                outputs_names = window.buffers.outputs if window.buffers is not None else []
                evaluated: list[tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]] = []
                for slot, result in zip(batch, closures):
                    picard_round.load(slot.index)
                    for parameter, gradient in zip(flat.params, slot.gradients()):
                        parameter.grad = gradient
                    if outputs_names:
                        window.buffers.load({name: slot.buffers[name] for name in outputs_names})  # type: ignore[union-attr]
                    if result.closure_loss is not None:
                        with slot.step_context():
                            call_callback_hooks(trainer, "on_after_backward")
                            call_lightning_module_hook(trainer, "on_after_backward")
                    else:
                        compat.warn_training_step_returned_none()
                    window.check_step_outputs(slot.index, slot.step)
                    live = window.buffers.live() if outputs_names else {}  # type: ignore[union-attr]
                    evaluated.append(
                        ([p.grad for p in flat.params], {name: live[name].clone() for name in outputs_names})
                    )
        except Exception as error:
            trainer.should_stop = stop_before
            self._evaluating_step = None
            outputs.clear()
            return error
        # Every slot evaluated: only now are the rows written (a failure above leaves them for the one-by-one pass).
        for slot, result, (gradients, step_outputs) in zip(batch, closures, evaluated):
            picard_round.load(slot.index)
            for parameter, gradient in zip(flat.params, gradients):
                parameter.grad = gradient
            if outputs_names:
                window.buffers.load(step_outputs)  # type: ignore[union-attr]
            loss = result.loss if result.closure_loss is not None else None
            picard_round.record_slot(slot.index, stop=slot.stop, loss=loss, more=bool(result.extra))
            outputs[slot.index] = result.asdict() if result.closure_loss is not None else {}
        return None

    def _batched_hook_failed(self, error: BaseException, slots: list[int], tau: int) -> BaseException:
        """``picard_training_step_slots`` raised but every slot succeeded one by one: the hook disagrees with
        ``training_step`` (or ran out of memory at the batched size). Fail the round at this rank's first slot."""
        first = min(slots)
        self.strategy.round.record_failure(first)
        error.picard_step = tau + first  # type: ignore[attr-defined]
        error.add_note(
            f"Picard: picard_training_step_slots raised for steps {sorted(tau + j for j in slots)}, where "
            "training_step, run one slot at a time, succeeded. Fix the hook, or set picard_training_step_slots = "
            "None on the module to evaluate slots one by one."
        )
        return error

    def _apply_logged(self, skip: int) -> None:
        """Let the values ``self.log`` recorded at this rank's accepted slots reach Lightning's results, in step
        order, so that epoch aggregates hold exactly the accepted steps (speculative ones are evaluated again).

        Step-level values stay those of this rank's first accepted step (step τ on rank 0, the logged step).
        """
        results = compat.training_results(self.trainer)
        stepped: set[str] = set()
        with self.strategy.slot_evaluation():  # a logged step was computed on one rank: sync_dist is per step
            for j in sorted(j for j in self._logged if j < skip):
                for key, value, batch_size in self._logged[j]:
                    metric = results[key]
                    if metric.meta.on_step and key in stepped:
                        if metric.meta.on_epoch:
                            compat.update_metric(results, key, value, batch_size, keep_step_value=True)
                    else:
                        compat.update_metric(results, key, value, batch_size)
                        stepped.add(key)
        self._logged = {}

    def _step_outputs(self, outputs: dict[int, Any], status: RoundStatus, skip: int) -> list[Any]:
        """What ``on_train_batch_end`` receives on every rank for each accepted step: the step's output.

        The rank that evaluated a step passes its own; the others rebuild it from the loss in the gathered status,
        or, when ``training_step`` returned more than its loss, receive it from a rank that evaluated it (with
        slot groups, the member for the same part), in one object gather for the round.
        """
        strategy = self.strategy
        if strategy.world_size == 1:
            return [outputs.get(j) for j in range(skip)]
        shared: dict[int, Any] = {}
        if any(status.returned_more(j) for j in range(skip)):
            shared = self._share_outputs(outputs, status, skip)
        steps: list[Any] = []
        for j in range(skip):
            if j in outputs:
                steps.append(outputs[j])
            elif status.returned_more(j):
                steps.append(shared[j])
            else:
                loss = status.loss(j)
                steps.append({} if loss is None else {"loss": loss.to(strategy.root_device)})
        return steps

    def _share_outputs(self, outputs: dict[int, Any], status: RoundStatus, skip: int) -> dict[int, Any]:
        """The accepted outputs with more than a loss that this rank did not evaluate, from ranks that did."""
        strategy = self.strategy
        mine = {
            j: apply_to_collection(outputs[j], torch.Tensor, lambda t: t.detach().cpu())
            for j in range(skip)
            if j in outputs and status.returned_more(j)
        }
        everyone = strategy.all_gather_objects(mine)
        group_size = strategy.slot_group_size
        member = strategy.global_rank % group_size
        shared: dict[int, Any] = {}
        for rank, theirs in enumerate(everyone):
            if rank % group_size != member:
                continue
            for j, output in theirs.items():
                if j not in outputs:
                    shared[j] = apply_to_collection(
                        output, torch.Tensor, lambda t: t.to(strategy.root_device)
                    )
        return shared

    def _replay(self, tau: int, n: int, status: RoundStatus, first_batch_idx: int) -> RoundResult:
        """The round's replay of its first ``n`` slots through the user's ``optimizer_step`` and step hook."""
        return self.strategy.round.replay(
            tau,
            n,
            status,
            apply_update=lambda j: self._apply_update(tau + j, first_batch_idx + j),
            extrapolate_update=lambda j: self._apply_update(tau + j, first_batch_idx + j, step_hook=False),
        )

    def _accept_before_failure(
        self, status: RoundStatus, outputs: dict[int, Any], tau: int, first_batch_idx: int
    ) -> None:
        """Before raising an evaluation's error: replay and accept the steps before it, as a sequential run would
        have taken them (with their ``on_train_batch_end``), so that a checkpoint written on the exception holds
        them (none is lost)."""
        failed_slot = min(step for step, _ in status.failed) - tau
        good = status.accepted_limit(failed_slot)
        if good == 0:
            return
        result = self._replay(tau, good, status, first_batch_idx)
        skip = result.skip
        accepted = self._take_accepted(skip)
        self._end_steps(tau, accepted, first_batch_idx, self._step_outputs(outputs, status, skip))
        self.batch_progress.increment_completed()
        self._batches_that_stepped = tau + skip

    def _take_accepted(self, skip: int) -> list[Any]:
        """Take the round's first ``skip`` steps as done: count them, apply what they logged, and return their
        batches (no longer buffered)."""
        accepted, self._batches[:skip] = self._batches[:skip], []
        self._count_steps(skip)
        self._apply_logged(skip)
        return accepted

    def _raise_if_a_rank_failed(self, status: RoundStatus, failure: BaseException | None) -> None:
        """If any rank's evaluation raised, every rank raises a :class:`PicardRankError` naming rank and step."""
        if not status.failed:
            return
        strategy = self.strategy
        step, rank = min(status.failed)
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
            call_lightning_module_hook(
                trainer,
                "optimizer_step",
                trainer.current_epoch,
                batch_idx,
                module.optimizers(use_pl_optimizer=True),
                _gradients_already_loaded,
            )
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step" and (batch_idx + 1) % config.frequency == 0:
                    call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)
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
        """Log the round's ``picard/*`` metrics (step-level, on rank 0's logger like any ``self.log``).

        One tensor is built for all of them (one host-to-device copy); after the first round the values go straight
        to the registered metrics, skipping ``self.log``'s per-call bookkeeping (its cost is per call, not per
        value, and would otherwise be paid eight times a round).
        """
        module = self.trainer.lightning_module
        window = self.strategy.window
        finite = [e for e in result.errors if math.isfinite(e)]
        converged = result.window_start + result.skip
        values = {
            "picard/skip": float(result.skip),
            "picard/rounds": float(window.rounds),
            "picard/threshold": result.threshold,
            "picard/error_median": aggregate_errors(result.errors, "median"),
            "picard/error_max": max(finite) if finite else math.nan,
            "picard/window_start": float(result.window_start),
            "picard/nonfinite": float(nonfinite),
            "picard/steps_per_round": converged / max(window.rounds, 1),
        }
        tensor = torch.tensor(list(values.values()), dtype=torch.float32, device=module.device)
        results = compat.training_results(self.trainer)
        with compat.logging_from(module, "training_step"):
            for i, name in enumerate(values):
                key = f"training_step.{name}"
                if key in results:
                    compat.update_metric(results, key, tensor[i], 1)
                else:
                    module.log(
                        name, tensor[i], on_step=True, on_epoch=False, batch_size=1, prog_bar=name in _ON_BAR
                    )

    def _send_to_loggers(self, tau: int, skip: int) -> None:
        """Log at step τ when this round completed a step that Lightning would have logged."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        crossed = every > 0 and (tau + skip) // every > tau // every
        if crossed or trainer.should_stop or trainer.fast_dev_run:
            connector = compat.logger_connector(trainer)
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


_ON_BAR = {"picard/steps_per_round"}


def _zero_grad(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, batch_idx: int) -> None:
    """What Lightning runs before a step's backward: ``on_before_zero_grad`` (callbacks, module), then the module's
    ``optimizer_zero_grad``."""
    call_callback_hooks(trainer, "on_before_zero_grad", optimizer)
    call_lightning_module_hook(trainer, "on_before_zero_grad", optimizer)
    call_lightning_module_hook(trainer, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)


def _recorder(logged: list[tuple[str, Any, int]]) -> Any:
    """Records one slot's ``self.log`` updates in ``logged`` instead of applying them."""

    def record(key: str, value: Any, batch_size: int) -> None:
        logged.append((key, value.clone() if isinstance(value, torch.Tensor) else value, batch_size))

    return record


def _fingerprint(batch: Any) -> list[float]:
    """Sum and sum of squares (float64) over every tensor in a batch."""
    total = [0.0, 0.0]

    def visit(tensor: torch.Tensor) -> None:
        values = tensor.detach().to(torch.float64)
        total[0] += values.sum().item()
        total[1] += values.square().sum().item()

    apply_to_collection(batch, torch.Tensor, visit)
    return total


def _gradients_already_loaded() -> None:
    """The closure handed to ``optimizer.step`` during replay: the gradients were loaded by the window."""
    return None
