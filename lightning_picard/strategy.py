"""PicardStrategy: processes, collectives and who owns which window slot."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_picard import compat, rng
from lightning_picard.buffers import ModuleBuffers
from lightning_picard.convergence import AGGREGATES, INITIALIZERS
from lightning_picard.flat import FlatParameters
from lightning_picard.hooks import (
    local_parameters,
    picard_buffers,
    picard_named_parameters,
    picard_step_outputs,
)
from lightning_picard.loop import check_trainer_supported, install_picard_loop
from lightning_picard.round import PicardRound, SlotOwnership
from lightning_picard.shard import WHOLE_BATCH, BatchShard
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow, RoundResult

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

_LAUNCH_ENVIRONMENT = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "RANK",
    "OMP_NUM_THREADS",
)

DEFAULT_TIMEOUT = timedelta(minutes=5)
"""How long a collective waits for a rank that stopped answering before every rank is stopped."""


class PicardStrategy(DDPStrategy):
    """Train a LightningModule as generalized Picard iterations over a sliding window of optimizer steps.

    Every rank holds the same window: the anchor (the exact sequential state at step τ) and guesses of
    the next ``window_size`` steps. Each round, slot ``j`` is evaluated by rank ``j mod world_size`` at its
    guess, with the batch and the random seed of step ``τ + j``; one ``all_gather`` shares the gradients;
    every rank replays the user's optimizer from the anchor and slides the window past the steps whose
    guesses were within the threshold. There is no coordinator rank and no parameter broadcast after setup.
    With ``slot_group_size=G``, slot ``j`` is evaluated by a group of G ranks that split its batch and average its
    gradient (data-parallel × time-parallel).

    With ``tolerance=0`` (or ``threshold=0``) the final parameters equal sequential training (with the
    :class:`StepSeed` callback) bit for bit; with a positive tolerance, fewer rounds than steps are needed.

    How close a guess must be (the convergence policy; docs/algorithm.md explains the choice): by default a guess
    is accepted when, for every parameter tensor (and counted Picard buffer), its squared distance from the
    replayed value is at most ``tolerance`` times the tensor's mean squared optimizer step in the round. The
    paper's rule, ``‖θ′ − θ‖²/D`` against an adapted ``threshold``, is selected by passing ``threshold``.

    Args:
        window_size: slots per round P; ``None`` means one slot per rank (per slot group with
            ``slot_group_size``). May exceed that (several slots per rank). Default is ``None``.
        threshold: the paper's convergence rule: the initial threshold on ``‖θ′ − θ‖² / D`` (DreamPropeller's
            configs say 5e-6), adapted every round with ``ema_decay`` (0.9 unless given). ``0`` gives the
            sequential result exactly. Default is ``None`` (use ``tolerance``); pass either, not both.
        ema_decay: γ of the threshold update ``e ← γ·e + (1 − γ)·M(errors)``, in ``[0, 1]``; ``1`` keeps the
            threshold fixed. No update follows a round whose guesses were all copies of the anchor (the first
            round). Default is ``None``: 1 (fixed) with ``tolerance``, 0.9 (the paper's) with ``threshold``.
        aggregate: ``M``: ``"median"`` (a true median) or ``"mean"``. Default is ``"median"``.
        init: guess for new slots: ``"copy"`` the last replayed state, or ``"extrapolate"`` by continuing the
            replay with the latest gradient. Default is ``"copy"``.
        seed: base of the per-step seeds: step ``s`` runs with ``seed + s``. Default is ``0``.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
            The backend defaults to NCCL on GPUs and gloo on CPU.
        timeout: how long a collective waits for a rank that stopped answering (5 minutes by default; raise it
            if ranks may spend longer apart, e.g. one rank building a prompt cache while others wait).
            An exception on any rank stops every rank at the next gather regardless of this timeout.
        tolerance: the convergence rule in units of the optimizer's steps: a guess is accepted when every
            tensor's ``‖θ′ − θ‖²`` is at most ``tolerance`` times that tensor's mean ``‖step‖²`` of the round
            (``1``: within one step, ``0.25``: within half a step). ``0`` gives the sequential result exactly.
            Default is ``None``: 0.1 unless ``threshold`` is given.
        max_threshold: upper bound of the adapted threshold, in the units of the rule in use. Default is
            ``None`` (no bound).
        slot_group_size: ranks per window slot G (data-parallel × time-parallel). Each slot is evaluated by a group
            of G consecutive ranks; each takes its part of the step's batch (:func:`lightning_picard.batch_shard`)
            and the group averages the slot's gradient, as DDP averages a step's. G must divide the number of
            processes; the window then has ``world_size / G`` slots unless ``window_size`` says otherwise.
            ``1`` is time-parallel only; G equal to the number of processes with ``window_size=1`` is plain
            data-parallel training. Default is ``1``.
        log_round_metrics: log the ``picard/*`` metrics of every round (skip, rounds, threshold, errors,
            steps per round) through ``self.log``, so they reach the loggers, the progress bar and
            ``trainer.callback_metrics``. ``False`` leaves the logged keys exactly those of the sequential run
            (``last_round`` still holds each round). Default is ``True``.
    """

    strategy_name = "picard"

    def __init__(
        self,
        window_size: int | None = None,
        threshold: float | None = None,
        ema_decay: float | None = None,
        aggregate: Literal["median", "mean"] = "median",
        init: Literal["copy", "extrapolate"] = "copy",
        seed: int = 0,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        tolerance: float | None = None,
        max_threshold: float | None = None,
        slot_group_size: int = 1,
        log_round_metrics: bool = True,
    ) -> None:
        if isinstance(slot_group_size, bool) or not isinstance(slot_group_size, int) or slot_group_size < 1:
            raise ValueError(
                f"slot_group_size must be a positive int (ranks per window slot), got {slot_group_size!r}."
            )
        error_units, threshold, ema_decay = _convergence_policy(
            threshold, tolerance, ema_decay, max_threshold
        )
        _validate_arguments(window_size, threshold, ema_decay, aggregate, init, seed)
        if timeout is not None and not (isinstance(timeout, timedelta) and timeout.total_seconds() > 0):
            raise ValueError(f"timeout must be a positive datetime.timedelta or None, got {timeout!r}.")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(
                f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}."
            )
        if process_group_backend not in (None, "nccl", "gloo", "mpi", "ucc", "xccl"):
            raise ValueError(
                f"process_group_backend must be None (NCCL on GPUs, gloo on CPU) or a torch.distributed backend "
                f"name such as 'nccl' or 'gloo', got {process_group_backend!r}."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.window_size_arg = window_size
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        self.aggregate = aggregate
        self.init = init
        self.seed = int(seed)
        self.error_units: Literal["step", "absolute"] = error_units  # type: ignore[assignment]
        self.max_threshold = None if max_threshold is None else float(max_threshold)
        self.slot_group_size = slot_group_size
        self.log_round_metrics = bool(log_round_metrics)
        self.round: PicardRound | None = None
        self._slot_group: Any = None
        self._window_group: Any = None
        self._environment_before_launch: dict[str, str | None] = {}
        self._owns_process_group = False
        self._slot_depth = 0
        self._fixed_parameters: set[int] = set()
        self._requeue_handler: Any = None
        self._requeue_pending: tuple[int, Any] | None = None

    @property
    def window_size(self) -> int:
        """Slots per round: the ``window_size`` argument, or one slot per slot group (the world size by default)."""
        if self.window_size_arg is not None:
            return self.window_size_arg
        return max(1, self.world_size // self.slot_group_size)

    @property
    def slots_per_rank(self) -> int:
        """Gradient rows each rank contributes to the all-gather: ``ceil(window_size / slot groups)``."""
        return self.ownership.slots_per_rank

    @property
    def ownership(self) -> SlotOwnership:
        """Which ranks evaluate which slot of the window (by global rank, over all nodes)."""
        return SlotOwnership(self.world_size, self.global_rank, self.window_size, self.slot_group_size)

    @property
    def batch_shard(self) -> BatchShard:
        """The part of each step's batch this rank evaluates (see :func:`lightning_picard.batch_shard`): its place
        in its slot group; the whole batch with ``slot_group_size=1``."""
        if self.slot_group_size == 1:
            return WHOLE_BATCH
        return BatchShard(self.global_rank % self.slot_group_size, self.slot_group_size)

    @property
    def window(self) -> PicardWindow | None:
        """The running fit's window (anchor and guesses); ``None`` outside ``fit``."""
        return self.round.window if self.round is not None else None

    @property
    def last_round(self) -> RoundResult | None:
        """The latest round's :class:`~lightning_picard.window.RoundResult` (its per-slot ``errors``, ``skip`` and
        ``threshold``), set before the ``on_train_batch_end`` of that round's steps; ``None`` before the first round."""
        return self.round.last_result if self.round is not None else None

    @property
    def at_round_end(self) -> bool:
        """Whether ``trainer.global_step`` is the end of the latest round (τ + skip): true in the
        ``on_train_batch_end`` of a round's last accepted step, false in those of the steps before it. A callback
        that acts once per round, or only where the module holds the step's own state (it holds the round's end
        state in every ``on_train_batch_end`` of the round), checks it. ``False`` before the first round."""
        last = self.last_round
        if last is None or self.lightning_module is None:
            return False
        return self.lightning_module.trainer.global_step == last.window_start + last.skip

    @property
    def flat(self) -> FlatParameters | None:
        """The running fit's Picard parameters as one flat buffer; ``None`` outside ``fit``."""
        return self.round.flat if self.round is not None else None

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}

    @override
    def configure_ddp(self) -> None:
        """No DDP wrapper: ranks hold different iterates and gradients are gathered explicitly."""

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            check_trainer_supported(trainer)
            _require_automatic_optimization(trainer.lightning_module)
            _refuse_sync_batchnorm(self, trainer.lightning_module)
        try:
            super().setup(trainer)
        except RuntimeError as error:
            if fitting and "multiple optimizers" in str(error):
                raise MisconfigurationException(_ONE_OPTIMIZER) from error
            raise
        if not fitting:
            return
        module = trainer.lightning_module
        self._check_optimization(trainer)
        self._synchronize_initial_state(module)
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        named = picard_named_parameters(module)
        fixed = [name for name, p in named if id(p) not in optimized]
        if fixed:
            rank_zero_info(
                f"Picard: trainable parameters {fixed[:5]}{' …' if len(fixed) > 5 else ''} are in no optimizer; as in "
                "Lightning they are never stepped, so they are not Picard state."
            )
        self._fixed_parameters = {id(p) for name, p in named if id(p) not in optimized}
        named = [(name, p) for name, p in named if id(p) in optimized]
        flat = FlatParameters([p for _, p in named], [name for name, _ in named])
        buffers, outputs = picard_buffers(module), picard_step_outputs(module)
        window = PicardWindow(
            flat,
            self.window_size,
            self.threshold,
            self.ema_decay,
            self.aggregate,
            self.init,
            buffers=ModuleBuffers(module, buffers, outputs) if buffers or outputs else None,
            resizable=callable(getattr(module, "picard_after_optimizer_step", None)),
            error_units=self.error_units,
            max_threshold=self.max_threshold,
        )
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        snapshot = OptimizerSnapshot(trainer.optimizers[0], schedulers)
        ownership = self._slot_groups(outputs)
        self.round = PicardRound(window, snapshot, ownership, self if self.world_size > 1 else None)
        install_picard_loop(trainer)
        log.info(
            "Picard: %d slots over %d rank(s) in groups of %d, %d parameters, threshold %.3g (%s, %s), ema_decay %.3g, "
            "init=%s",
            self.window_size,
            self.world_size,
            self.slot_group_size,
            flat.numel,
            self.threshold,
            "squared steps" if self.error_units == "step" else "‖Δθ‖²/D",
            "exact" if self.threshold == 0 else "fixed" if self.ema_decay == 1 else "adaptive",
            self.ema_decay,
            self.init,
        )

    def _slot_groups(self, step_outputs: list[str]) -> SlotOwnership:
        """The slot ownership; with ``slot_group_size > 1``, also the process groups of the round: each slot group
        (its members average a slot's gradient) and each window group (one member of every slot group, which
        gather the window's rows)."""
        try:
            ownership = self.ownership
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None
        if self.slot_group_size == 1:
            return ownership
        if step_outputs:
            raise MisconfigurationException(
                f"picard_step_outputs ({step_outputs}) are not supported with slot_group_size > 1: a step's outputs "
                "would be each rank's part of its batch, and Picard has no rule to combine them. Use "
                "slot_group_size=1, or compute those values in picard_after_optimizer_step."
            )
        size, groups = ownership.group_size, ownership.groups
        self._slot_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(g * size, (g + 1) * size)) for g in range(groups)]
        )
        self._window_group, _ = dist.new_subgroups_by_enumeration(
            [[m + g * size for g in range(groups)] for m in range(size)]
        )
        return ownership

    def _release_slot_groups(self) -> None:
        for group in (self._slot_group, self._window_group):
            if group is not None and dist.is_initialized():
                dist.destroy_process_group(group)
        self._slot_group = self._window_group = None

    def _check_optimization(self, trainer: pl.Trainer) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"{_ONE_OPTIMIZER} configure_optimizers returned {len(trainer.optimizers)}."
            )
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None:
            raise MisconfigurationException(
                "PicardStrategy does not support precision='16-mixed' (the loss scaler cannot be replayed). "
                "Use precision='bf16-mixed', 'bf16-true' or '32-true'."
            )
        _check_optimizer_covers_module(trainer.optimizers[0], trainer.lightning_module)
        if isinstance(trainer.optimizers[0], torch.optim.LBFGS):
            raise MisconfigurationException(
                "PicardStrategy cannot replay LBFGS: its step re-evaluates the loss. Use a first-order optimizer."
            )
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau and config.interval == "step":
                raise MisconfigurationException(
                    "PicardStrategy does not support ReduceLROnPlateau with interval='step' (its metric is not "
                    "known inside the replay). Use interval='epoch' or a step-indexed schedule."
                )

    def _synchronize_initial_state(self, module: pl.LightningModule) -> None:
        """Start every rank from rank 0's weights, buffers and global RNG states."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
        states = self.broadcast(rng.get_rng_states() if self.global_rank == 0 else None, src=0)
        states.pop("cuda", None)
        rng.set_rng_states(states)

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Leave the module and optimizer at the last converged state, so a checkpoint written now is valid."""
        if self.round is not None:
            self.round.abort()
        super().on_exception(exception)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._hold_requeue_signal()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._handle_held_requeue_signal()

    def _hold_requeue_signal(self) -> None:
        """On SLURM with auto-requeue, make the requeue signal wait for the start of the next round.

        Lightning's handler writes a checkpoint where the signal lands; inside a round the module holds a guess and
        ``global_step`` is the slot's step, so the checkpoint would be no sequential state. At a round's start the
        module, optimizer, schedulers and progress counters hold the anchor.
        """
        environment = self.cluster_environment
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        requeue_signal = environment.requeue_signal
        if requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(requeue_signal)
        if not callable(handler):
            return
        self._requeue_handler, self._requeue_pending = handler, None
        signal.signal(requeue_signal, self._note_requeue_signal)

    def _note_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_pending = (signum, frame)

    def _handle_held_requeue_signal(self) -> None:
        pending, self._requeue_pending = self._requeue_pending, None
        if pending is None or self._requeue_handler is None or self.global_rank != 0:
            return  # on the other ranks Lightning's handler writes nothing and does not requeue
        step = self.lightning_module.trainer.global_step
        rank_zero_info(
            f"Picard: handling SLURM's requeue signal before the round that starts at step {step}."
        )
        # Its checkpoint ends with a barrier that the other ranks, which got the signal in another round or drop it,
        # would not join: run it with collectives that see this rank alone.
        with self.slot_evaluation():
            self._requeue_handler(*pending)

    def is_picard_parameter(self, parameter: torch.nn.Parameter) -> bool:
        """Whether a trainable, non-local parameter is Picard state (False for those in no optimizer)."""
        return id(parameter) not in self._fixed_parameters

    @contextmanager
    def slot_evaluation(self) -> Iterator[None]:
        """While a slot is evaluated on one rank (``training_step``, backward and their hooks), collectives see that
        rank alone: the step is computed once, by one rank, as in a sequential run.

        ``reduce`` returns its input (a step's value, as on one device), ``broadcast`` returns ``obj``,
        ``barrier`` does nothing, ``reduce_boolean_decision`` returns the decision, and ``all_gather`` raises:
        its result would have one entry per rank, which a step computed on one rank does not have.
        """
        self._slot_depth += 1
        try:
            yield
        finally:
            self._slot_depth -= 1

    @property
    def evaluating_slot(self) -> bool:
        """Whether a slot is being evaluated (see :meth:`slot_evaluation`)."""
        return self._slot_depth > 0

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if self.evaluating_slot:
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.evaluating_slot:
            return obj
        return super().broadcast(obj, src=src)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.evaluating_slot:
            return
        super().barrier(*args, **kwargs)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self.evaluating_slot:
            return decision
        return super().reduce_boolean_decision(decision, all=all)

    @override
    def all_gather(
        self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False
    ) -> torch.Tensor:
        if self.evaluating_slot:
            hook = compat.current_hook(self.lightning_module) or "training_step"
            raise MisconfigurationException(
                f"all_gather was called in `{hook}` while PicardStrategy evaluated a step on one rank: each step is "
                "computed once, by one rank, so there is nothing to gather from the others (and ranks evaluate "
                "different numbers of steps). Use the step's own values; for metrics, self.log(...) with or without "
                "sync_dist works (Picard applies each accepted step's value once). Gather in on_train_batch_end or "
                "at epoch end instead, where every rank takes part."
            )
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (``[obj]`` with one rank); every rank must call it."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_rows(self, local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """All-gather every rank's ``[slots_per_rank, L]`` gradient rows in one collective.

        ``local`` may be this rank's chunk of ``out`` (as :class:`~lightning_picard.round.PicardRound` allocates
        them): the gather is then in place, which saves ``slots_per_rank`` rows.
        """
        if self.world_size == 1:
            return local
        if out is None:
            out = local.new_empty((self.world_size * local.shape[0], local.shape[1]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local)
        return out

    def gather_window_rows(self, local: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The round's gather (:class:`~lightning_picard.round.RoundCollectives`): every slot's rows, from one member
        of each slot group (all ranks with ``slot_group_size=1``)."""
        if self._window_group is None:
            return self.gather_rows(local, out)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local, group=self._window_group)
        return out

    def reduce_slot_rows(self, local: torch.Tensor) -> None:
        """Sum ``local`` over this rank's slot group, in place."""
        dist.all_reduce(local, group=self._slot_group)

    def gather_status_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's status rows, in rank order."""
        return self.gather_rows(local)

    @override
    def _configure_launcher(self) -> None:
        try:  # refused here, in the launching process, before any process starts
            SlotOwnership(self.num_processes * self.num_nodes, 0, 1, self.slot_group_size)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None
        self._environment_before_launch = {key: os.environ.get(key) for key in _LAUNCH_ENVIRONMENT}
        if self.num_processes == 1 and self.num_nodes == 1:
            # One rank needs no launcher: it runs in this process (forking after multi-threaded work can deadlock in
            # OpenMP, the caller gets the trained Trainer back, and no process-observer thread is left behind).
            self._launcher = None
            return
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        if self._start_method == "fork" and self.num_processes > 1 and _parent_was_multithreaded():
            # OpenMP is not fork-safe: a child forked from a process whose thread pool ran deadlocks in its first
            # parallel region. One intra-op thread never enters one.
            torch.set_num_threads(1)
            rank_zero_warn(
                "picard_fork: the launching process already ran multi-threaded work, so each forked rank uses one "
                "CPU thread (OpenMP is not fork-safe). Use strategy='picard' or 'picard_spawn' for multi-threaded "
                "ranks."
            )
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        self._owns_process_group = not dist.is_initialized()
        super().setup_distributed()

    @override
    def teardown(self) -> None:
        self._requeue_handler, self._requeue_pending = None, None
        self.round = None
        self._release_slot_groups()
        super().teardown()
        if self.world_size == 1 and self._owns_process_group and dist.is_initialized():
            # A single in-process rank: leave no process group or launcher variables behind; a later fork-based
            # fit would otherwise think its processes were created externally and wait for them forever.
            dist.destroy_process_group()
            for key, value in self._environment_before_launch.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: compat.StrategyRegistry) -> None:
        for name, start_method in (("picard", "popen"), ("picard_spawn", "spawn"), ("picard_fork", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"Picard (DreamPropeller) parallel-in-time training, start_method='{start_method}'",
                override=True,
                start_method=start_method,
            )


_ONE_OPTIMIZER = (
    "PicardStrategy supports exactly one optimizer: put all parameters in one optimizer with several param groups "
    "(per-group learning rates are replayed exactly)."
)


def _parent_was_multithreaded() -> bool:
    """In a forked child: whether the parent process runs more than one thread (True where this is unknown)."""
    try:
        return len(os.listdir(f"/proc/{os.getppid()}/task")) > 1
    except OSError:
        return True


def _refuse_sync_batchnorm(strategy: PicardStrategy, module: pl.LightningModule) -> None:
    synced = [name for name, m in module.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    if getattr(strategy, "_layer_sync", None) is not None or synced:
        raise MisconfigurationException(
            "PicardStrategy does not support sync_batchnorm / torch.nn.SyncBatchNorm: it all-reduces batch statistics "
            "inside training_step, but each Picard step is evaluated on one rank (ranks evaluate different steps). "
            "Use Trainer(sync_batchnorm=False) and plain BatchNorm (each step sees its whole batch), or GroupNorm."
        )


def _check_optimizer_covers_module(optimizer: torch.optim.Optimizer, module: pl.LightningModule) -> None:
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    local = {id(p) for p in local_parameters(module)}
    if optimized & local:
        raise MisconfigurationException(
            "Parameters returned by picard_local_parameters() are also in the optimizer of configure_optimizers. "
            "Rank-local parameters must have their own optimizer, stepped by the module (e.g. in "
            "on_after_backward); remove them from the main optimizer."
        )
    trainable = {id(p) for p in module.parameters() if p.requires_grad and id(p) not in local}
    foreign = [key for key in optimized if key not in trainable]
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    if any(key not in frozen for key in foreign):
        raise MisconfigurationException(
            "The optimizer holds parameters that are not the module's parameters: the module's parameters were "
            "replaced after configure_optimizers. Create parameters in __init__ (or configure_model) and build the "
            "optimizer from self.parameters() in configure_optimizers."
        )


def _require_automatic_optimization(module: pl.LightningModule) -> None:
    if not module.automatic_optimization:
        raise MisconfigurationException(
            "PicardStrategy needs automatic optimization: it computes gradients itself and replays your "
            "optimizer. Remove `self.automatic_optimization = False` (and manual `opt.step()` calls)."
        )


def _validate_arguments(
    window_size: int | None, threshold: float, ema_decay: float, aggregate: str, init: str, seed: int
) -> None:
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)):
        raise TypeError(f"window_size must be an int or None, got {type(window_size).__name__}.")
    if window_size is not None and window_size < 1:
        raise ValueError(
            f"window_size must be at least 1 (or None for one slot per rank), got {window_size}."
        )
    if not threshold >= 0:
        raise ValueError(
            f"threshold must be >= 0, got {threshold}. Use 0 for exact sequential results, or a small positive "
            "value such as 5e-6 for speed."
        )
    if not 0 <= ema_decay <= 1:
        raise ValueError(
            f"ema_decay must be in [0, 1], got {ema_decay}. 1 keeps the threshold fixed; the paper uses 0.9."
        )
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    if init not in INITIALIZERS:
        raise ValueError(f"init must be one of {INITIALIZERS}, got {init!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")


DEFAULT_TOLERANCE = 0.1
"""The default ``tolerance``: a guess is accepted when every tensor is within about a third of its optimizer step
(√0.1) of its replayed value: the largest measured value that kept every non-chaotic case of
benchmarks/convergence.py within 1% of the seed-to-seed distance (docs/algorithm.md)."""


def _convergence_policy(
    threshold: float | None, tolerance: float | None, ema_decay: float | None, max_threshold: float | None
) -> tuple[str, float, float]:
    """``(error units, initial threshold, ema_decay)`` from the arguments: ``tolerance`` (in squared optimizer
    steps, fixed by default) or the paper's ``threshold`` (‖Δθ‖²/D, adapted with γ = 0.9 by default)."""
    if threshold is not None and tolerance is not None:
        raise ValueError(
            f"Pass either tolerance ({tolerance}, in squared optimizer steps) or threshold ({threshold}, the paper's "
            "‖Δθ‖²/D), not both."
        )
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(
            f"tolerance must be a number >= 0, got {tolerance!r}. Use 0 for exact sequential results; "
            f"{DEFAULT_TOLERANCE} (the default) accepts a guess whose squared distance from its replayed value is "
            "at most 0.1 optimizer steps squared, per parameter tensor."
        )
    if max_threshold is not None and not (
        isinstance(max_threshold, (int, float)) and not isinstance(max_threshold, bool) and max_threshold >= 0
    ):
        raise ValueError(f"max_threshold must be None or a number >= 0, got {max_threshold!r}.")
    if threshold is not None:
        units, value, decay = "absolute", threshold, 0.9 if ema_decay is None else ema_decay
    else:
        value = DEFAULT_TOLERANCE if tolerance is None else tolerance
        units, decay = "step", 1.0 if ema_decay is None else ema_decay
    if max_threshold is not None and isinstance(value, (int, float)) and value > max_threshold:
        raise ValueError(
            f"The initial threshold ({value}) is above max_threshold ({max_threshold}): the threshold starts there "
            "and adapts up to max_threshold. Raise max_threshold or lower the tolerance/threshold."
        )
    return units, value, decay


def at_round_end(trainer: pl.Trainer) -> bool:
    """Whether a callback that acts once per Picard round should act now, in ``on_train_batch_end``: the step is its
    round's last (:attr:`PicardStrategy.at_round_end`). Always ``True`` under another strategy, where every step is
    a round of one."""
    strategy = trainer.strategy
    return strategy.at_round_end if isinstance(strategy, PicardStrategy) else True
