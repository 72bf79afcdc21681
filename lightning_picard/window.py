"""Generalized Picard iteration over optimizer steps, in pure torch (no Lightning, no processes).

Sequential training is the map ``θ_{s+1}, o_{s+1} = U(θ_s, o_s, g_s, s)``: the user's optimizer step with its
schedulers and gradient clipping. A :class:`PicardWindow` holds the anchor ``θ_τ`` (final: exactly what
sequential training has at step τ) and guesses ``θ_{τ+1} … θ_{τ+P}``. One round takes the gradients
evaluated at every slot, replays ``U`` from the anchor, measures how far each guess was from its replayed
value, and slides the anchor to the first step whose guess was off by more than the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from lightning_picard.buffers import ModuleBuffers, copy_buffers
from lightning_picard.convergence import (
    SMALLEST_ERROR,
    Aggregate,
    ErrorUnits,
    Initializer,
    aggregate_errors,
    first_unconverged,
    segment_squares,
    squared_norm,
    step_relative_errors,
)
from lightning_picard.flat import FlatParameters, Layout
from lightning_picard.resize import Lineage, ResizeEvent, rebase, resize_event, row_maps, unproject
from lightning_picard.snapshot import OptimizerSnapshot


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


@dataclass
class _Row:
    """One window state: parameter values in ``layout``, the Picard buffers, and the resizes since the anchor."""

    values: torch.Tensor
    layout: Layout
    buffers: dict[str, torch.Tensor]
    lineage: Lineage = ()


@dataclass
class _Evaluated:
    """What a slot was evaluated on: its row's layout and lineage, and the shapes of its step outputs."""

    layout: Layout
    lineage: Lineage
    outputs: dict[str, torch.Size]


Resize = Mapping[str, torch.Tensor]
"""A module's report of changed dimensions: tensor name → parent row (in the old tensor) of each new row."""

UpdateFn = Callable[[int], "Resize | None"]
"""Applies the user's optimizer step for window slot ``j`` (step ``τ + j``), gradients already loaded, then the
module's step hook; returns the hook's resize report, if any."""


class PicardWindow:
    """Anchor and guesses of a sliding window of ``window_size`` optimizer steps, with the adaptive threshold.

    Memory: ``window_size + 1`` parameter vectors, one scratch vector and one optimizer-state snapshot (two
    with ``init="extrapolate"`` when a full window converged); the Picard buffers, if any, once per vector.

    Rows may differ in size when the module changes dimensions (see :mod:`lightning_picard.resize`): each row
    remembers its layout and the resize events since the anchor, gradients evaluated on a guess of another size
    are mapped onto the replayed state (``unproj``) and errors are measured after the mapping. A guess whose
    resize history differs from the replay's is never exactly converged (its error is at least the smallest
    positive float), so ``threshold=0`` stays exact.

    Args:
        flat: the module's parameters, re-seated as one flat buffer.
        window_size: number of slots P evaluated per round.
        threshold: initial error threshold; ``0`` disables adaptation and reproduces sequential training.
        ema_decay: γ in ``e ← γ·e + (1 − γ)·M(errors)``; ``1`` keeps the threshold fixed. The threshold does
            not adapt from a round whose guesses were all copies of the anchor (the first round, a re-initialised
            window): their errors measure how far the parameters move, not how good a guess is.
        aggregate: ``M``, a true ``"median"`` or the ``"mean"`` of the round's errors.
        error_units: ``"absolute"``: ``err_j = ‖θ′ − θ‖² / D`` (the paper's). ``"step"``: per parameter tensor
            (and counted buffer, times its weight) ``‖θ′ − θ‖²`` over the tensor's mean squared replayed step of
            the round, the largest over tensors: the squared distance of a guess from its replayed value in steps
            of the optimizer (see :func:`step_relative_errors`).
        max_threshold: upper bound of the adapted threshold (``None``: none).
        init: how new slots are guessed: ``"copy"`` the last replayed state, or ``"extrapolate"`` by
            continuing the replay with the latest gradient.
        buffers: module buffers that are Picard state (carried with every row), if any.
        resizable: whether updates may change the parameters' shapes or storage (the module has a step hook);
            if not, the per-step resize bookkeeping is skipped.
    """

    def __init__(
        self,
        flat: FlatParameters,
        window_size: int,
        threshold: float,
        ema_decay: float,
        aggregate: Aggregate = "median",
        init: Initializer = "copy",
        buffers: ModuleBuffers | None = None,
        resizable: bool = True,
        error_units: ErrorUnits = "absolute",
        max_threshold: float | None = None,
    ) -> None:
        self.flat = flat
        self.resizable = resizable
        self.window_size = window_size
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        self.error_units: ErrorUnits = error_units
        self.max_threshold = max_threshold
        self._cold = True  # every guess is a copy of the anchor
        self._step_scale: torch.Tensor | None = None
        self.aggregate: Aggregate = aggregate
        self.init: Initializer = init
        self.buffers = buffers
        self.adaptive = threshold > 0
        self.rounds = 0
        self._round: _RoundInFlight | None = None
        self._end_snapshot: OptimizerSnapshot | None = None
        self._rows = [self._new_row() for _ in range(window_size + 1)]
        self._start = 0
        self._scratch = self._new_row()
        self._maps: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, torch.Tensor] | None] = {}

    def _new_row(self) -> _Row:
        return _Row(self.flat.flat.detach().clone(), self.flat.layout, self._buffer_copy())

    def _buffer_copy(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return self.buffers.copy(into) if self.buffers is not None else {}

    def _row(self, j: int) -> _Row:
        return self._rows[(self._start + j) % (self.window_size + 1)]

    def guess(self, j: int) -> torch.Tensor:
        """Parameter values of row ``j``: the anchor for ``j = 0``, else the guess of step ``τ + j``."""
        return self._row(j).values

    def row_state(self, j: int) -> tuple[torch.Tensor, Layout, dict[str, torch.Tensor]]:
        """Row ``j``'s parameter values, their shapes and its Picard buffers (the window's own tensors: read only)."""
        row = self._row(j)
        return row.values, row.layout, row.buffers

    def slot_numel(self, j: int) -> int:
        """Values a gathered row of slot ``j`` carries after the presence flags: the gradients of row ``j``'s
        parameters and its step outputs (rows differ only when the module changes dimensions)."""
        row = self._row(j)
        outputs = self.buffers.outputs_numel(row.buffers) if self.buffers is not None else 0
        return row.values.numel() + outputs

    def check_step_outputs(self, j: int, step: int) -> None:
        """Raise if ``training_step`` gave a step output another shape than row ``j`` has for it."""
        if self.buffers is None:
            return
        row = self._row(j)
        for name in self.buffers.outputs:
            shape, expected = self.buffers.module.get_buffer(name).shape, row.buffers[name].shape
            if shape != expected:
                raise ValueError(
                    f"Step output {name!r} has shape {tuple(shape)} after training_step of step {step}, but "
                    f"{tuple(expected)} before it. Keep step outputs sized like the rows they describe: resize them "
                    "in picard_after_optimizer_step (and report them) when the rows change."
                )

    def load(self, j: int) -> None:
        """Set the module's parameters (and Picard buffers) to window row ``j``."""
        self._load_row(self._row(j))

    def _load_row(self, row: _Row) -> None:
        self.flat.set_layout(row.layout)
        self.flat.flat.copy_(row.values)
        if self.buffers is not None:
            self.buffers.load(row.buffers)

    def _record(self, row: _Row, lineage: Lineage) -> None:
        """Write the module's current state into ``row``."""
        flat = self.flat.flat
        if row.values.shape == flat.shape:
            row.values.copy_(flat)
        else:
            row.values = flat.detach().clone()
        row.layout = self.flat.layout
        self._buffer_copy(row.buffers)
        row.lineage = lineage

    def _copy_row(self, source: _Row, target: _Row) -> None:
        if target.values.shape == source.values.shape:
            target.values.copy_(source.values)
        else:
            target.values = source.values.clone()
        target.layout = source.layout
        copy_buffers(source.buffers, target.buffers)
        target.lineage = source.lineage

    def reset_to(self) -> None:
        """Make every row equal to the module's current parameters and Picard buffers."""
        for row in self._rows:
            self._record(row, ())
        self._start = 0
        self._cold = True

    def run_round(
        self,
        window_start: int,
        n: int,
        gradient_row: Callable[[int], torch.Tensor],
        apply_update: UpdateFn,
        snapshot: OptimizerSnapshot,
        presence: Sequence[Sequence[bool]] | None = None,
        extrapolate_update: UpdateFn | None = None,
    ) -> RoundResult:
        """Replay ``n`` steps from the anchor with the slots' gradients, decide the slide, slide.

        On entry the module's parameters, optimizer and schedulers hold the anchor state. On exit they hold
        the new anchor state (step ``τ + skip``), exactly what sequential training has there when the
        accepted guesses were exact.

        Args:
            window_start: τ, the anchor's step.
            n: slots evaluated this round (≤ window size; smaller near the end or at checkpoint boundaries).
            gradient_row: slot index → its gradient row (see :class:`FlatParameters`), in the layout of the
                row the slot was evaluated at.
            apply_update: runs the optimizer step of slot ``j`` after its gradients were loaded, and the
                module's step hook; returns the hook's resize report.
            snapshot: snapshot of the optimizer used to return to the anchor state.
            presence: per slot, which parameters have a gradient (read from the rows if not given).
            extrapolate_update: the update used to extrapolate guesses past the window with ``init="extrapolate"``
                (default ``apply_update``). The strategy leaves the module's step hook out of it: densifying on
                a repeated gradient's statistics makes worse guesses (docs/benchmarks.md).
        """
        if not 1 <= n <= self.window_size:
            raise ValueError(f"n must be in [1, {self.window_size}], got {n}")
        if presence is None:
            presence = [self.flat.presence(gradient_row(j)) for j in range(n)]
        evaluated = [self._evaluated(self._row(j)) for j in range(n)]
        self._maps.clear()  # keyed by event identity: valid while this round's lineages keep the events alive
        self._round = _RoundInFlight(snapshot)
        snapshot.capture()
        errors_device = torch.zeros(n, dtype=torch.float64, device=self.flat.flat.device)
        sizes = []
        relative = self.error_units == "step"
        exact = self.threshold <= SMALLEST_ERROR  # only then must a difference that underflows count
        parts: list[torch.Tensor] = []  # per slot: ‖θ′ − θ‖² of each tensor (step units only)
        steps: list[torch.Tensor] = []  # per slot: ‖θ′_{τ+j+1} − θ′_{τ+j}‖² of each tensor
        weights: list[list[float]] = []

        def replay(
            gradient_slot: int, update_slot: int, lineage: Lineage, update: UpdateFn = apply_update
        ) -> Lineage:
            """Replay step τ + update_slot with the gradient (and step outputs) of slot gradient_slot."""
            return self._replay_step(
                gradient_row(gradient_slot),
                presence[gradient_slot],
                evaluated[gradient_slot],
                lineage,
                partial(update, update_slot),
                window_start + update_slot,
            )

        def extrapolate(gradient_slot: int, update_slot: int, lineage: Lineage) -> Lineage:
            return replay(gradient_slot, update_slot, lineage, extrapolate_update or apply_update)

        lineage: Lineage = ()
        for j in range(n):
            before = lineage
            lineage = replay(j, j, lineage)
            target = self._row(j + 1)
            errors_device[j], size = self._squared_error(
                target, lineage, norm=exact or not relative, exact=exact
            )
            sizes.append(size)
            if relative:
                error_parts, step_parts, part_weights = self._relative_parts(
                    target, self._row(j), lineage, resized=lineage is not before
                )
                parts.append(error_parts)
                steps.append(step_parts)
                weights.append(part_weights)
            self._record(target, lineage)
        if relative:
            errors = self._step_errors(errors_device if exact else None, parts, steps, weights)
        else:
            errors = [e / size for e, size in zip(errors_device.tolist(), sizes)]
        threshold_used = self.threshold
        skip = first_unconverged(errors, threshold_used)
        if self.adaptive and not self._cold:
            m = aggregate_errors(errors, self.aggregate)
            if math.isfinite(m):
                self.threshold = self.ema_decay * self.threshold + (1.0 - self.ema_decay) * m
                if self.max_threshold is not None:
                    self.threshold = min(self.threshold, self.max_threshold)
        self._cold = False

        self._copy_row(self._row(0), self._scratch)
        self._round.anchor_in_scratch = True
        needs_second_replay = skip < n
        self._fill_new_slots(n, skip, extrapolate, lineage, snapshot, needs_second_replay)
        if needs_second_replay:
            self._load_row(self._scratch)
            snapshot.restore()
            lineage = ()
            for j in range(skip):
                lineage = replay(j, j, lineage)
        self._start = (self._start + skip) % (self.window_size + 1)
        new_anchor = window_start + skip
        for row in self._rows:
            if row.lineage:
                row.lineage = rebase(row.lineage, new_anchor)
        self.rounds += 1
        self._round = None
        self._maps.clear()
        return RoundResult(window_start=window_start, skip=skip, errors=errors, threshold=self.threshold)

    def _relative_parts(
        self, target: _Row, previous: _Row, lineage: Lineage, resized: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Per tensor (parameters, then counted buffers): ‖θ′ − guess‖², ‖θ′ − previous replayed state‖² (NaN
        where this step resized the tensor) and the tensor's weight in the error."""
        flat = self.flat.flat
        maps = self._row_maps(target.lineage, lineage)
        if maps is None:  # _squared_error left θ′ − guess in the scratch buffer
            error = segment_squares(self._scratch.values, self.flat.numels)
        else:
            error = self._mapped_parameter_errors(target, maps)
        device = flat.device
        if resized or previous.layout != self.flat.layout:
            step = torch.full((len(self.flat.numels),), math.nan, dtype=torch.float64, device=device)
        else:
            if self._scratch.values.shape != flat.shape:
                self._scratch.values = torch.empty_like(flat)
            torch.sub(flat, previous.values, out=self._scratch.values)  # its θ′ − guess is read above
            step = segment_squares(self._scratch.values, self.flat.numels)
        weights = [1.0 if n else 0.0 for n in self.flat.numels]
        if self.buffers is not None and self.buffers.weights:
            buffer_errors = self.buffers.squared_differences(target.buffers, maps)
            buffer_steps = self.buffers.squared_differences(previous.buffers)
            error = torch.cat([error, torch.stack([term for _, term, _ in buffer_errors])])
            step_terms = [term for _, term, _ in buffer_steps]
            step = torch.cat(
                [
                    step,
                    torch.full_like(torch.stack(step_terms), math.nan)
                    if resized
                    else torch.stack(step_terms),
                ]
            )
            weights += [self.buffers.weights[name] if numel else 0.0 for name, _, numel in buffer_errors]
        return error, step, weights

    def _step_errors(
        self,
        absolute: torch.Tensor | None,
        parts: Sequence[torch.Tensor],
        steps: Sequence[torch.Tensor],
        weights: Sequence[Sequence[float]],
    ) -> list[float]:
        """The round's errors in step units (one host read); with ``absolute`` (the errors' squared norms, given at
        a zero threshold) a guess that differs at all is never 0."""
        errors = torch.stack(list(parts))
        step = torch.stack(list(steps))
        weight = torch.tensor(weights, dtype=torch.float64, device=errors.device)
        fallback = self._step_scale
        if fallback is not None and fallback.shape != step.shape[1:]:
            fallback = None
        relative, self._step_scale = step_relative_errors(errors, step, weight, fallback)
        if absolute is None:
            return relative.tolist()
        floor = (absolute > 0).to(torch.float64) * SMALLEST_ERROR
        return torch.maximum(relative, floor).tolist()

    def _row_maps(self, source: Lineage, target: Lineage) -> dict[str, torch.Tensor] | None:
        """:func:`row_maps`, memoised within a round: the error of row j + 1 and the gradient of slot j + 1 need
        the same map."""
        if not (source or target):
            return None
        key = (tuple(map(id, source)), tuple(map(id, target)))
        if key not in self._maps:
            self._maps[key] = row_maps(source, target)
        return self._maps[key]

    def _evaluated(self, row: _Row) -> _Evaluated:
        outputs = self.buffers.outputs if self.buffers is not None else ()
        return _Evaluated(row.layout, row.lineage, {name: row.buffers[name].shape for name in outputs})

    def _replay_step(
        self,
        gradient: torch.Tensor,
        present: Sequence[bool],
        evaluated: _Evaluated,
        lineage: Lineage,
        update: Callable[[], Resize | None],
        step: int,
    ) -> Lineage:
        """Load a gradient onto the replayed state (``unproj`` if it was evaluated on other rows), run the
        update of ``step`` and adopt the module's resize report; returns the replayed state's lineage."""
        maps = self._row_maps(evaluated.lineage, lineage)
        self.flat.load_gradients(gradient, present, evaluated.layout, maps)
        if evaluated.outputs:
            numel = self.flat.header + sum(shape.numel() for shape in evaluated.layout)
            self.buffers.load_outputs(gradient[numel:], evaluated.outputs, maps)  # type: ignore[union-attr]
        if not self.resizable:
            update()
            return lineage
        before = self._shapes()
        report = update()
        self.flat.absorb()
        event = resize_event(report, step, before, self._shapes())
        return lineage if event is None else (*lineage, event)

    def _shapes(self) -> dict[str, torch.Size]:
        """Shapes of the Picard parameters and buffers by name."""
        shapes = dict(zip(self.flat.names, self.flat.layout))
        if self.buffers is not None:
            shapes.update({n: b.shape for n, b in self.buffers.live().items()})
        return shapes

    def _squared_error(
        self, target: _Row, lineage: Lineage, norm: bool = True, exact: bool = True
    ) -> tuple[torch.Tensor, int]:
        """‖replayed − guess‖² (after mapping the guess onto the replayed rows) and the number of values.

        Leaves replayed − guess in the scratch row when no resize maps them. Without ``norm`` only that difference
        is computed (the error returned is 0); ``exact`` keeps a difference that underflows from reading as 0.
        """
        flat = self.flat.flat
        maps = self._row_maps(target.lineage, lineage)
        if maps is None:
            if target.layout != self.flat.layout:
                raise RuntimeError(
                    f"A guess has parameter shapes {target.layout} but the replay has {self.flat.layout} with no "
                    "resize event between them: report every change of a parameter's rows from "
                    "picard_after_optimizer_step."
                )
            if self._scratch.values.shape != flat.shape:
                self._scratch.values = torch.empty_like(flat)
            torch.sub(flat, target.values, out=self._scratch.values)
            if not norm:
                return torch.zeros((), dtype=torch.float64, device=flat.device), self.flat.numel
            error = squared_norm(self._scratch.values, exact_zero=exact)
        else:
            error = self._mapped_parameter_error(target, maps)
        size = self.flat.numel
        if self.buffers is not None:
            buffer_error, buffer_size = self.buffers.squared_difference(target.buffers, maps)
            if buffer_error is not None:
                error = error + buffer_error
                size += buffer_size
        if maps is not None:
            error = torch.maximum(
                error, torch.tensor(SMALLEST_ERROR, dtype=torch.float64, device=error.device)
            )
        return error, size

    def _mapped_parameter_error(self, target: _Row, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._mapped_parameter_errors(target, maps).sum()

    def _mapped_parameter_errors(self, target: _Row, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """‖θ′ − unproj(guess)‖² per parameter tensor (NaN for a tensor without a counterpart)."""
        device = self.flat.flat.device
        errors = []
        offset = 0
        for name, p, shape in zip(self.flat.names, self.flat.params, target.layout):
            guess = target.values[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
            if name in maps:
                guess = unproject(guess, maps[name], missing=math.nan)
            if guess.shape != p.shape:
                errors.append(torch.tensor(math.nan, dtype=torch.float64, device=device))
            else:
                errors.append(squared_norm(p.detach() - guess))
        return torch.stack(errors)

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
            self._load_row(self._scratch)
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
        replay: Callable[[int, int, Lineage], Lineage],
        lineage: Lineage,
        snapshot: OptimizerSnapshot,
        replay_again: bool,
    ) -> None:
        """Guess the ``skip`` steps that enter the window at its end (ring rows ``P + 1 … P + skip``).

        ``replay(gradient_slot, update_slot, lineage)`` replays one step; ``lineage`` is the replayed state's.
        """
        P = self.window_size
        last = self._row(P)
        if self.init == "copy" or n < P:
            for k in range(1, skip + 1):
                self._copy_row(last, self._row(P + k))
            return
        # Continue the replay past τ + P with the latest gradient. The optimizer is at step τ + P now.
        at_end = None
        if not replay_again:
            at_end = self._end_snapshot
            if at_end is None or at_end.optimizer is not snapshot.optimizer:
                at_end = self._end_snapshot = OptimizerSnapshot(snapshot.optimizer, snapshot.schedulers)
            at_end.capture()
        for k in range(1, skip + 1):  # rows P + k wrap onto rows 0 … P − 1: row P stays intact
            lineage = replay(n - 1, P - 1 + k, lineage)
            self._record(self._row(P + k), lineage)
        if at_end is not None:
            self._load_row(last)
            at_end.restore()

    def state_dict(self) -> dict[str, Any]:
        """Window rows in order (anchor first), threshold and round counter, for checkpoints (on the CPU)."""
        rows = [self._row(j) for j in range(self.window_size + 1)]
        return {
            "rows": [
                {
                    "values": row.values.detach().cpu().clone(),
                    "layout": [list(shape) for shape in row.layout],
                    "buffers": {k: v.detach().cpu().clone() for k, v in row.buffers.items()},
                    "lineage": [
                        {
                            "step": event.step,
                            "parents": {k: v.cpu() for k, v in event.parents.items()},
                            "rows_before": dict(event.rows_before),
                        }
                        for event in row.lineage
                    ],
                }
                for row in rows
            ],
            "threshold": self.threshold,
            "error_units": self.error_units,
            "rounds": self.rounds,
            "window_size": self.window_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore from :meth:`state_dict`; returns a sentence saying what was restored or re-initialised.

        The module's parameters and buffers must already hold the checkpoint's anchor (Lightning restores the
        module first); the guesses are re-initialised from it if the checkpoint's window does not fit this run.
        """
        if state.get("error_units", "absolute") == self.error_units:  # else the configured threshold stays
            self.threshold = float(state["threshold"])
        self.rounds = int(state["rounds"])
        rows = state.get("rows")
        if rows is None and "guesses" in state:  # the format before rows could differ in size
            rows = [
                {"values": g, "layout": [list(s) for s in self.flat.layout], "buffers": {}, "lineage": []}
                for g in state["guesses"]
            ]
        device, dtype = self.flat.flat.device, self.flat.flat.dtype
        anchor_layout = tuple(torch.Size(s) for s in rows[0]["layout"]) if rows else None
        buffer_names = sorted(self.buffers.names) if self.buffers is not None else []
        if (
            len(rows) != self.window_size + 1
            or anchor_layout != self.flat.layout
            or any(sorted(row["buffers"]) != buffer_names for row in rows)
        ):
            self.reset_to()
            return (
                f"the checkpoint's window ({len(rows) - 1} slots, anchor shapes {anchor_layout}) does not match this "
                f"run's ({self.window_size} slots, shapes {self.flat.layout}); the guesses were re-initialised from "
                "the anchor"
            )
        for target, saved in zip(self._rows, rows):
            target.values = saved["values"].to(device, dtype).clone()
            target.layout = tuple(torch.Size(s) for s in saved["layout"])
            target.buffers = {k: v.to(device).clone() for k, v in saved["buffers"].items()}
            target.lineage = tuple(
                ResizeEvent(
                    int(e["step"]),
                    {k: v.to(device) for k, v in e["parents"].items()},
                    dict(e["rows_before"]),
                )
                for e in saved["lineage"]
            )
        self._start = 0
        self._cold = False
        return f"restored {self.window_size} guesses, threshold {self.threshold:.3g}, {self.rounds} rounds"
