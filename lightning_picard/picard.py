"""Generalized Picard iteration over optimizer steps, in pure torch (no Lightning, no processes).

Sequential training is the map ``θ_{s+1}, o_{s+1} = U(θ_s, o_s, g_s, s)``: the user's optimizer step with its
schedulers and gradient clipping. A :class:`PicardWindow` holds the anchor ``θ_τ`` (final: exactly what
sequential training has at step τ) and guesses ``θ_{τ+1} … θ_{τ+P}``. One round takes the gradients
evaluated at every slot, replays ``U`` from the anchor, measures how far each guess was from its replayed
value, and slides the anchor to the first step whose guess was off by more than the threshold.

The parameters are made views of one flat buffer (:class:`FlatParameters`) so that loading a guess,
measuring an error and recording a replayed state are single kernels on one tensor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Aggregate = Literal["median", "mean"]
Initializer = Literal["copy", "extrapolate"]
AGGREGATES: tuple[str, ...] = ("median", "mean")
INITIALIZERS: tuple[str, ...] = ("copy", "extrapolate")


class FlatParameters:
    """Parameters re-seated as views of one contiguous buffer, plus the flat layout of their gradients.

    A gradient row holds ``numel`` gradient values followed by one flag per parameter tensor (1 if the
    parameter received a gradient, 0 if its ``.grad`` was ``None``), so that replay skips exactly the
    parameters the sequential optimizer would skip.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("Picard needs at least one trainable parameter; the module has none.")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"All trainable parameters must share one dtype and device for Picard, got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}. Cast the module to one "
                "dtype (e.g. precision='bf16-true' or '32-true') before fitting."
            )
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self._slices = []
        offset = 0
        for p, n in zip(self.params, self.numels):
            p.data = self.flat[offset : offset + n].view_as(p)
            self._slices.append(slice(offset, offset + n))
            offset += n
        self._grad_flat = torch.zeros_like(self.flat)
        self._grad_views = [self._grad_flat[s].view_as(p) for s, p in zip(self._slices, self.params)]

    @property
    def row_length(self) -> int:
        """Length of one gradient row: the gradients and one presence flag per parameter tensor."""
        return self.numel + len(self.params)

    def new_rows(self, n: int) -> torch.Tensor:
        """A zeroed ``[n, row_length]`` buffer on the parameters' device and dtype."""
        return self.flat.new_zeros((n, self.row_length))

    def write_gradients(self, row: torch.Tensor) -> None:
        """Copy the current ``.grad`` of every parameter into ``row`` (zeros and flag 0 where ``None``)."""
        flags = row[self.numel :]
        for i, (p, s) in enumerate(zip(self.params, self._slices)):
            if p.grad is None:
                row[s].zero_()
                flags[i] = 0
            else:
                row[s].copy_(p.grad.reshape(-1))
                flags[i] = 1

    def load_gradients(self, row: torch.Tensor, present: Sequence[bool]) -> None:
        """Set ``.grad`` of every parameter from ``row``; ``None`` where ``present`` is False.

        The gradients are copied into storage owned here, so in-place changes (gradient clipping) by the
        optimizer step never alter ``row``.
        """
        self._grad_flat.copy_(row[: self.numel])
        for p, view, has_grad in zip(self.params, self._grad_views, present):
            if not has_grad:
                p.grad = None
            elif p.grad is not view:
                p.grad = view

    def presence(self, row: torch.Tensor) -> list[bool]:
        """Which parameters have a gradient in ``row`` (one host read of the flags)."""
        return [bool(v) for v in row[self.numel :].tolist()]


class OptimizerSnapshot:
    """A deep copy of an optimizer's state, its hyperparameters and its LR schedulers' state.

    ``Optimizer.load_state_dict(state_dict())`` aliases state tensors since PyTorch 2.1, so a snapshot taken
    that way changes when the optimizer steps. Here tensors are copied on capture and copied back on restore;
    the snapshot stays valid after a restore, and its buffers are reused from one capture to the next.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = ()) -> None:
        self.optimizer = optimizer
        self.schedulers = list(schedulers)
        self._state: dict[torch.Tensor, dict[str, Any]] | None = None
        self._groups: list[dict[str, Any]] = []
        self._scheduler_states: list[dict[str, Any]] = []

    @property
    def captured(self) -> bool:
        """Whether :meth:`capture` has been called."""
        return self._state is not None

    def capture(self) -> None:
        """Copy the optimizer's current state."""
        previous = self._state or {}
        self._state = {p: _copy_state(s, previous.get(p)) for p, s in self.optimizer.state.items() if s}
        self._groups = [
            {k: _clone(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        self._scheduler_states = [copy.deepcopy(s.state_dict()) for s in self.schedulers]

    def restore(self) -> None:
        """Copy the captured state back into the optimizer and schedulers."""
        if self._state is None:
            raise RuntimeError("OptimizerSnapshot.restore() called before capture().")
        current = self.optimizer.state
        for p in [p for p in current if p not in self._state]:
            del current[p]
        for p, saved in self._state.items():
            current[p] = _copy_state(saved, current.get(p))
        for group, saved in zip(self.optimizer.param_groups, self._groups):
            group.update({k: _clone(v) for k, v in saved.items()})
        for scheduler, saved in zip(self.schedulers, self._scheduler_states):
            scheduler.load_state_dict(copy.deepcopy(saved))


def _copy_state(source: dict[str, Any], reuse: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, written into ``reuse``'s tensors when they match."""
    if reuse is not None and reuse.keys() == source.keys():
        tensors = [k for k, v in source.items() if isinstance(v, torch.Tensor)]
        if all(
            isinstance(reuse[k], torch.Tensor)
            and reuse[k].shape == source[k].shape
            and reuse[k].dtype == source[k].dtype
            and reuse[k].device == source[k].device
            for k in tensors
        ):
            for k, v in source.items():
                if k in tensors:
                    reuse[k].copy_(v)
                else:
                    reuse[k] = copy.deepcopy(v)
            return reuse
    return {k: _clone(v) for k, v in source.items()}


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


_SMALLEST_ERROR = torch.finfo(torch.float64).tiny


def squared_norm(difference: torch.Tensor) -> torch.Tensor:
    """‖difference‖² as a float64 scalar on the device, without a host sync and without a float64 copy.

    The sum runs in float32 (in place of the 8·D-byte float64 copy a float64 reduction needs). Squares of
    tiny differences can underflow to 0 there, so a non-zero difference whose norm underflows is reported
    as the smallest positive float64: an error is 0 exactly when the guess equals its replayed value, which
    keeps ``threshold=0`` exact.
    """
    accumulate = torch.float32 if difference.dtype in (torch.float16, torch.bfloat16) else None
    norm = torch.linalg.vector_norm(difference, dtype=accumulate).to(torch.float64).square()
    low, high = torch.aminmax(difference)  # a nonzero test ~10x cheaper than .any() on CPU
    floor = ((low != 0) | (high != 0)).to(torch.float64) * _SMALLEST_ERROR
    return torch.maximum(norm, floor)


def first_unconverged(errors: Sequence[float], threshold: float) -> int:
    """The slide length: 1 + the number of leading errors within ``threshold`` (at most ``len(errors)``).

    ``errors[i]`` compares the guess of step ``τ + i + 1`` with its replayed value. A non-finite error
    counts as unconverged.
    """
    for i, err in enumerate(errors):
        if not err <= threshold:
            return i + 1
    return len(errors)


def aggregate_errors(errors: Sequence[float], how: Aggregate) -> float:
    """A true median or the mean of the finite errors (``nan`` if none is finite)."""
    finite = sorted(e for e in errors if math.isfinite(e))
    if not finite:
        return math.nan
    if how == "mean":
        return sum(finite) / len(finite)
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


@dataclass
class RoundResult:
    """What one Picard round decided."""

    window_start: int
    """τ before the round."""
    skip: int
    """Steps the anchor advanced (≥ 1)."""
    errors: list[float]
    """Squared distance per dimension between each guess and its replayed value, steps τ+1 … τ+n."""
    threshold: float
    """The threshold after this round's update."""


@dataclass
class _RoundInFlight:
    snapshot: OptimizerSnapshot
    anchor_in_scratch: bool = False


UpdateFn = Callable[[int], None]
"""Applies the user's optimizer step for window slot ``j`` (step ``τ + j``); gradients are already loaded."""


class PicardWindow:
    """Anchor and guesses of a sliding window of ``window_size`` optimizer steps, with the adaptive threshold.

    Memory: ``window_size + 1`` parameter vectors in a ring buffer, one scratch vector and one optimizer-state
    snapshot (two with ``init="extrapolate"`` when a full window converged).

    Args:
        flat: the module's parameters, re-seated as one flat buffer.
        window_size: number of slots P evaluated per round.
        threshold: initial error threshold; ``0`` disables adaptation and reproduces sequential training.
        ema_decay: γ in ``e ← γ·e + (1 − γ)·M(errors)``.
        aggregate: ``M``, a true ``"median"`` or the ``"mean"`` of the round's errors.
        init: how new slots are guessed: ``"copy"`` the last replayed state, or ``"extrapolate"`` by
            continuing the replay with the latest gradient.
    """

    def __init__(
        self,
        flat: FlatParameters,
        window_size: int,
        threshold: float,
        ema_decay: float,
        aggregate: Aggregate = "median",
        init: Initializer = "copy",
    ) -> None:
        self.flat = flat
        self.window_size = window_size
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        self.aggregate: Aggregate = aggregate
        self.init: Initializer = init
        self.adaptive = threshold > 0
        self.rounds = 0
        self._round: _RoundInFlight | None = None
        self._end_snapshot: OptimizerSnapshot | None = None
        self._ring = flat.flat.detach().unsqueeze(0).repeat(window_size + 1, 1)
        self._start = 0
        self._scratch = torch.empty_like(flat.flat)

    def guess(self, j: int) -> torch.Tensor:
        """Row ``j`` of the window: the anchor for ``j = 0``, else the guess of step ``τ + j``."""
        return self._ring[(self._start + j) % (self.window_size + 1)]

    def load(self, j: int) -> None:
        """Set the module's parameters to window row ``j``."""
        self.flat.flat.copy_(self.guess(j))

    def reset_to(self, params: torch.Tensor | None = None) -> None:
        """Make every row equal to ``params`` (default: the module's current parameters)."""
        source = self.flat.flat if params is None else params
        self._ring.copy_(source.detach().unsqueeze(0).expand_as(self._ring))
        self._start = 0

    def run_round(
        self,
        window_start: int,
        n: int,
        gradient_row: Callable[[int], torch.Tensor],
        apply_update: UpdateFn,
        snapshot: OptimizerSnapshot,
        presence: Sequence[Sequence[bool]] | None = None,
    ) -> RoundResult:
        """Replay ``n`` steps from the anchor with the slots' gradients, decide the slide, slide.

        On entry the module's parameters, optimizer and schedulers hold the anchor state. On exit they hold
        the new anchor state (step ``τ + skip``), exactly what sequential training has there when the
        accepted guesses were exact.

        Args:
            window_start: τ, the anchor's step.
            n: slots evaluated this round (≤ window size; smaller near the end or at checkpoint boundaries).
            gradient_row: slot index → its gradient row (see :class:`FlatParameters`).
            apply_update: runs the optimizer step of slot ``j`` after its gradients were loaded.
            snapshot: snapshot of the optimizer used to return to the anchor state.
            presence: per slot, which parameters have a gradient (read from the rows if not given).
        """
        if not 1 <= n <= self.window_size:
            raise ValueError(f"n must be in [1, {self.window_size}], got {n}")
        flat = self.flat.flat
        if presence is None:
            presence = [self.flat.presence(gradient_row(j)) for j in range(n)]
        self._round = _RoundInFlight(snapshot)
        snapshot.capture()
        errors_device = torch.zeros(n, dtype=torch.float64, device=flat.device)
        for j in range(n):
            self.flat.load_gradients(gradient_row(j), presence[j])
            apply_update(j)
            target = self.guess(j + 1)
            torch.sub(flat, target, out=self._scratch)
            errors_device[j] = squared_norm(self._scratch)
            target.copy_(flat)
        errors = (errors_device / self.flat.numel).tolist()
        threshold_used = self.threshold
        skip = first_unconverged(errors, threshold_used)
        if self.adaptive:
            m = aggregate_errors(errors, self.aggregate)
            if math.isfinite(m):
                self.threshold = self.ema_decay * self.threshold + (1.0 - self.ema_decay) * m

        self._scratch.copy_(self.guess(0))
        self._round.anchor_in_scratch = True
        needs_second_replay = skip < n
        self._fill_new_slots(n, skip, gradient_row, presence, apply_update, snapshot, needs_second_replay)
        if needs_second_replay:
            flat.copy_(self._scratch)
            snapshot.restore()
            for j in range(skip):
                self.flat.load_gradients(gradient_row(j), presence[j])
                apply_update(j)
        self._start = (self._start + skip) % (self.window_size + 1)
        self.rounds += 1
        self._round = None
        return RoundResult(window_start=window_start, skip=skip, errors=errors, threshold=self.threshold)

    def abort_round(self) -> bool:
        """After an exception inside :meth:`run_round`: put the anchor back into the parameters and optimizer.

        The guesses are re-initialised from the anchor if the round had started overwriting them. Returns
        whether a round was in flight. Outside a round the parameters already hold the anchor after
        :meth:`load` ``(0)``, which this also does.
        """
        round_ = self._round
        self._round = None
        if round_ is None:
            self.load(0)
            return False
        if round_.anchor_in_scratch:
            self.flat.flat.copy_(self._scratch)
            self.reset_to()
        else:
            self.load(0)
        if round_.snapshot.captured:
            round_.snapshot.restore()
        return True

    def _fill_new_slots(
        self,
        n: int,
        skip: int,
        gradient_row: Callable[[int], torch.Tensor],
        presence: list[list[bool]],
        apply_update: UpdateFn,
        snapshot: OptimizerSnapshot,
        replay_again: bool,
    ) -> None:
        """Guess the ``skip`` steps that enter the window at its end (ring rows ``P + 1 … P + skip``)."""
        P = self.window_size
        last = self.guess(P)
        if self.init == "copy" or n < P:
            for k in range(1, skip + 1):
                self.guess(P + k).copy_(last)
            return
        # Continue the replay past τ + P with the latest gradient. The optimizer is at step τ + P now.
        at_end = None
        if not replay_again:
            at_end = self._end_snapshot
            if at_end is None or at_end.optimizer is not snapshot.optimizer:
                at_end = self._end_snapshot = OptimizerSnapshot(snapshot.optimizer, snapshot.schedulers)
            at_end.capture()
        for k in range(1, skip + 1):
            self.flat.load_gradients(gradient_row(n - 1), presence[n - 1])
            apply_update(P - 1 + k)
            self.guess(P + k).copy_(self.flat.flat)
        if at_end is not None:
            self.flat.flat.copy_(last)
            at_end.restore()

    def state_dict(self) -> dict[str, Any]:
        """Window rows in order (anchor first), threshold and round counter, for checkpoints."""
        order = [(self._start + j) % (self.window_size + 1) for j in range(self.window_size + 1)]
        return {
            "guesses": self._ring[order].detach().cpu().clone(),
            "threshold": self.threshold,
            "rounds": self.rounds,
            "window_size": self.window_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore from :meth:`state_dict`; returns a sentence saying what was restored or re-initialised."""
        self.threshold = float(state["threshold"])
        self.rounds = int(state["rounds"])
        guesses: torch.Tensor = state["guesses"]
        if guesses.shape != self._ring.shape:
            self.reset_to()
            return (
                f"the checkpoint's window ({guesses.shape[0] - 1} slots of {guesses.shape[1]} values) does not "
                f"match this run's ({self.window_size} slots of {self._ring.shape[1]}); the guesses were "
                "re-initialised from the anchor"
            )
        self._ring.copy_(guesses.to(self._ring.device, self._ring.dtype))
        self._start = 0
        return f"restored {self.window_size} guesses, threshold {self.threshold:.3g}, {self.rounds} rounds"
