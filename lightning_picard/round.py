"""One Picard round, owned in one place: who evaluates which slot, the gathered rows, the snapshot, the replay.

Data flows one way (shared/DESIGN.md §1): this rank's slot gradients → its rows → one all-gather → the status read
once → the replay → the errors → the slide. The training loop (:mod:`lightning_picard.loop`) runs the slots through
Lightning and hands each slot's result to :meth:`PicardRound.record_slot`; it never reads or writes a row.

A gathered row is ``[status | presence flags | gradient values | step outputs]``. The status columns hold exact
integers in the row's dtype viewed as integers of the same width, so they are the same in float32, float16 and
bfloat16 (no float rounding, no overflow): the slot's failure, non-finite, stop and SIGTERM flags, the checksum
of the anchor, and the slot's loss as the bits of a float64 (what every rank hands ``on_train_batch_end``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lightning_picard.errors import PicardReplicaError
from lightning_picard.flat import FlatParameters
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow, RoundResult, UpdateFn


class RoundCollectives(Protocol):
    """The collectives of a round (the strategy provides them; none is called with one rank)."""

    def gather_window_rows(self, local: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """All-gather one rank of each slot group's ``[slots_per_rank, L]`` rows into ``out``
        (``[groups · slots_per_rank, L]``): every rank then holds every slot's row."""

    def reduce_slot_rows(self, local: torch.Tensor) -> None:
        """Sum ``local`` over this rank's slot group, in place (only called with ``group_size > 1``)."""

    def gather_status_rows(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's ``[slots_per_rank, S]`` integer status (only called with ``group_size > 1``)."""


_INTEGER_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOSS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOSS_ONLY, _LOSS_AND_MORE = 1, 1 + len(_LOSS_DTYPES)  # kind codes; 0: the slot returned no loss


@dataclass(frozen=True)
class SlotOwnership:
    """Which ranks evaluate which window slot.

    The ranks form ``groups = world_size / group_size`` slot groups of consecutive ranks (rank ``r`` is member
    ``r mod group_size`` of group ``r // group_size``). Slot ``j`` is evaluated by group ``j mod groups``, in row
    ``j // groups`` of that group's rows; each member evaluates its part of the slot's batch, and the group
    averages the slot's gradient. With ``group_size=1`` (the default) every rank is a group: slot ``j`` on rank
    ``j mod world_size``.

    Args:
        world_size: ranks over all nodes.
        rank: this process's global rank.
        window_size: slots per round P.
        group_size: ranks per slot group G; must divide ``world_size``. Default is ``1``.
    """

    world_size: int
    rank: int
    window_size: int
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.world_size % self.group_size:
            raise ValueError(
                f"slot_group_size={self.group_size} does not divide the {self.world_size} processes: each window slot "
                "is evaluated by a group of slot_group_size ranks, so the number of processes (devices × num_nodes) "
                "must be a multiple of it."
            )

    @property
    def groups(self) -> int:
        """Slot groups (the time-parallel width): ``world_size / group_size``."""
        return self.world_size // self.group_size

    @property
    def group(self) -> int:
        """This rank's slot group."""
        return self.rank // self.group_size

    @property
    def member(self) -> int:
        """This rank's place in its slot group (its part of each step's batch)."""
        return self.rank % self.group_size

    @property
    def slots_per_rank(self) -> int:
        """Rows each rank contributes to the gather: ``ceil(window_size / groups)``."""
        return -(-self.window_size // self.groups)

    def owned(self, n: int) -> list[int]:
        """The slots among the first ``n`` that this rank evaluates, last first (slot 0 is evaluated last, so the
        module holds the anchor's evaluation state when the round's hooks run)."""
        return [j for j in range(n) if j % self.groups == self.group][::-1]

    def local_row(self, slot: int) -> int:
        """Row of ``slot`` in its ranks' rows."""
        return slot // self.groups

    def gathered_row(self, slot: int) -> int:
        """Row of ``slot`` in the gathered ``[groups · slots_per_rank, …]`` rows (one rank of each group)."""
        return (slot % self.groups) * self.slots_per_rank + slot // self.groups

    def status_rows(self, slot: int) -> list[int]:
        """Rows of ``slot`` in the ``[world_size · slots_per_rank, …]`` status of every rank: one per member of
        the group that evaluates it."""
        first = (slot % self.groups) * self.group_size
        return [
            rank * self.slots_per_rank + slot // self.groups for rank in range(first, first + self.group_size)
        ]

    def rank_of(self, status_row: int) -> int:
        """The rank that wrote a row of the every-rank status (with ``group_size=1``: of the gathered rows)."""
        return status_row // self.slots_per_rank


@dataclass
class RoundStatus:
    """The gathered status of a round, read with one host copy; the same on every rank.

    Attributes:
        failed: ``(step, rank)`` of every evaluation that raised.
        nonfinite: slots whose gradient holds a NaN or an infinity.
        stops: slots whose ``training_step`` set ``trainer.should_stop``.
        sigterm: whether any rank received SIGTERM before this round.
        presence: per slot, which parameter tensors have a gradient.
        loss_kinds: per slot, the status's loss code: 0 if it returned no loss, else what :meth:`loss` decodes.
        loss_bits: per slot, its loss as the integer columns of its row (for this rank's part with slot groups).
        integer: the integer dtype those columns are in.
    """

    failed: list[tuple[int, int]]
    nonfinite: list[int]
    stops: list[int]
    sigterm: bool
    presence: list[list[bool]]
    loss_kinds: list[int]
    loss_bits: list[list[int]]
    integer: torch.dtype

    @property
    def loss_only(self) -> list[bool]:
        """Per slot, whether its ``training_step`` returned nothing but its loss."""
        return [0 < kind < _LOSS_AND_MORE for kind in self.loss_kinds]

    def returned_more(self, j: int) -> bool:
        """Whether slot ``j``'s ``training_step`` returned more than its loss."""
        return self.loss_kinds[j] >= _LOSS_AND_MORE

    def loss(self, j: int) -> torch.Tensor | None:
        """Slot ``j``'s loss in the dtype it was recorded in, ``None`` if it returned none (decoded on demand: the
        rank that evaluated a slot has its output already)."""
        kind = self.loss_kinds[j]
        if not kind:
            return None
        dtype = _LOSS_DTYPES[(kind - _LOSS_ONLY) % len(_LOSS_DTYPES)]
        return torch.tensor(self.loss_bits[j], dtype=self.integer).view(torch.float64).to(dtype).reshape(())

    @property
    def losses(self) -> list[torch.Tensor | None]:
        """Every slot's :meth:`loss`."""
        return [self.loss(j) for j in range(len(self.loss_kinds))]

    def accepted_limit(self, n: int) -> int:
        """Slots the replay may accept: up to the first non-finite guess (not on the true trajectory unless it is
        the anchor's own gradient) and up to and including the first step that asked training to stop."""
        nonfinite = [j for j in self.nonfinite if 0 < j < n]
        if nonfinite:
            n = nonfinite[0]
        stops = [j for j in self.stops if j < n]
        return stops[0] + 1 if stops else n


class PicardRound:
    """Runs Picard rounds over a :class:`PicardWindow`: owns the gathered rows and their format, the slot
    ownership, the optimizer snapshot and the replay.

    One round: :meth:`begin`, then per owned slot :meth:`load` (the guess into the module), the caller's evaluation
    and :meth:`record_slot` (or :meth:`record_failure`), then :meth:`gather` and :meth:`replay`.

    Args:
        window: the window (anchor and guesses) of the module's flat parameters.
        snapshot: the optimizer (and schedulers) state the replay returns to.
        ownership: which ranks evaluate which slot.
        collectives: the round's collectives (``None`` with one rank).
    """

    def __init__(
        self,
        window: PicardWindow,
        snapshot: OptimizerSnapshot,
        ownership: SlotOwnership,
        collectives: RoundCollectives | None,
    ) -> None:
        if ownership.world_size > 1 and collectives is None:
            raise ValueError("A round over several ranks needs the strategy's collectives.")
        self.window = window
        self.snapshot = snapshot
        self.ownership = ownership
        self._collectives = collectives
        self._local: torch.Tensor | None = None
        self._gathered: torch.Tensor | None = None
        flat = window.flat
        self._loss_columns = 8 // flat.flat.element_size()
        self._checksum = 3
        self._columns = {"failed": 0, "nonfinite": 1, "stop": 2, "sigterm": 3, "checksum": 4}
        self._columns["loss_kind"] = 4 + self._checksum
        self._columns["loss"] = self._columns["loss_kind"] + 1
        self._status = self._columns["loss"] + self._loss_columns
        self.last_result: RoundResult | None = None
        """The latest round's result (``window_start``, ``skip``, ``errors`` per slot, ``threshold``)."""

    @property
    def flat(self) -> FlatParameters:
        return self.window.flat

    @property
    def status_columns(self) -> int:
        """Integer columns before the presence flags in each row."""
        return self._status

    def release_buffers(self) -> None:
        """Drop the row buffers (a new fit may have another module); they are rebuilt on the next round."""
        self._local = self._gathered = None

    def begin(self, n: int, sigterm: bool = False) -> list[int]:
        """Start a round of ``n`` slots; returns this rank's slots, in evaluation order.

        ``sigterm``: this rank received SIGTERM; every rank learns it at the gather (no collective of its own).
        """
        window, flat = self.window, self.flat
        length = self._status + flat.header + max(window.slot_numel(j) for j in range(n))
        if self._local is None or self._local.shape[1] != length:
            ownership = self.ownership
            rows = ownership.slots_per_rank
            self._gathered = flat.flat.new_zeros((ownership.groups * rows, length))
            self._local = self._gathered[ownership.group * rows : (ownership.group + 1) * rows]
        status = _integers(self._local[:, : self._status])
        status.zero_()
        columns = self._columns
        checksum = columns["checksum"]
        status[:, checksum : checksum + self._checksum] = _checksum(window.guess(0), self._checksum)
        if sigterm:
            status[:, columns["sigterm"]] = 1
        return self.ownership.owned(n)

    def load(self, j: int) -> None:
        """Set the module's parameters (and Picard buffers) to slot ``j``'s guess (``0``: the anchor)."""
        self.window.load(j)

    def record_slot(
        self, j: int, stop: bool = False, loss: torch.Tensor | None = None, more: bool = False
    ) -> None:
        """Write slot ``j``'s gradients (the parameters' ``.grad``), step outputs and flags into its row.

        Args:
            stop: ``training_step`` set ``trainer.should_stop`` (honoured only if the step is accepted).
            loss: the slot's loss (``None``: it returned none).
            more: ``training_step`` returned more than its loss.
        """
        window, flat = self.window, self.flat
        index = self.ownership.local_row(j)
        row = self._local[index]  # type: ignore[index]
        status = _integers(row[: self._status])
        gradient = row[self._status : self._status + flat.row_length]
        flat.write_gradients(gradient)
        columns = self._columns
        status[columns["nonfinite"]] = _has_nonfinite(gradient[flat.header :])
        if stop:
            status[columns["stop"]] = 1
        if loss is not None:
            kind = _LOSS_AND_MORE if more else _LOSS_ONLY
            dtype = loss.dtype if loss.dtype in _LOSS_DTYPES else torch.float64
            status[columns["loss_kind"]] = kind + _LOSS_DTYPES.index(dtype)
            bits = loss.detach().reshape(()).to(torch.float64).reshape(1).view(status.dtype)
            status[columns["loss"] : columns["loss"] + self._loss_columns] = bits
        if window.buffers is not None and window.buffers.outputs:
            window.buffers.write_outputs(row[self._status + flat.row_length :])

    def record_failure(self, j: int) -> None:
        """Slot ``j``'s evaluation raised: every rank learns it at the gather. Puts the anchor back."""
        status = _integers(self._local[self.ownership.local_row(j), : self._status])  # type: ignore[index]
        status[self._columns["failed"]] = j + 1
        self.window.load(0)

    def gather(self, tau: int, n: int) -> RoundStatus:
        """Share the rows and read their status (one host copy); raise :class:`PicardReplicaError` on every rank if
        the ranks' anchors differ.

        With slot groups the members' rows are first averaged over the group (the slot's gradient is the mean of its
        parts' gradients, as in data-parallel training), then one member of each group's rows are gathered, and the
        every-rank status separately (it says which rank failed, stopped or got SIGTERM).
        """
        ownership, collectives = self.ownership, self._collectives
        local = self._local
        if ownership.group_size > 1:
            self._average_over_slot_group(local)  # type: ignore[arg-type]
        gathered = local
        if ownership.groups > 1:
            gathered = collectives.gather_window_rows(local, self._gathered)  # type: ignore[union-attr]
        self._gathered = gathered
        header = self._status + self.flat.header
        head = _integers(gathered[:, :header]).tolist()
        if ownership.group_size > 1:
            statuses = collectives.gather_status_rows(_integers(local[:, : self._status]).contiguous())  # type: ignore
            everyone = statuses.tolist()
        else:
            everyone = head
        columns = self._columns
        checksum = slice(columns["checksum"], columns["checksum"] + self._checksum)
        per_rank = ownership.slots_per_rank
        for index in range(0, len(everyone), per_rank):
            if everyone[index][checksum] != everyone[0][checksum]:
                raise PicardReplicaError(index // per_rank, tau)
        rows = [head[ownership.gathered_row(j)] for j in range(n)]
        slot_status = [[everyone[index] for index in ownership.status_rows(j)] for j in range(n)]
        failed = [
            (tau + row[columns["failed"]] - 1, ownership.rank_of(index))
            for index, row in enumerate(everyone)
            if row[columns["failed"]]
        ]
        loss = slice(columns["loss"], columns["loss"] + self._loss_columns)
        return RoundStatus(
            failed=failed,
            nonfinite=[j for j in range(n) if any(row[columns["nonfinite"]] for row in slot_status[j])],
            stops=[j for j in range(n) if any(row[columns["stop"]] for row in slot_status[j])],
            sigterm=any(row[columns["sigterm"]] for row in everyone),
            presence=[[bool(v) for v in row[self._status :]] for row in rows],
            loss_kinds=[row[columns["loss_kind"]] for row in rows],
            loss_bits=[row[loss] for row in rows],
            integer=_INTEGER_VIEW[gathered.element_size()],
        )

    def _average_over_slot_group(self, local: torch.Tensor) -> None:
        """Average this group's rows over its members; each member's status columns stay its own, and a slot is
        non-finite if its average is (a sum of finite parts may overflow)."""
        status = _integers(local[:, : self._status])
        own = status.clone()
        self._collectives.reduce_slot_rows(local)  # type: ignore[union-attr]
        values = local[:, self._status :]
        values.div_(self.ownership.group_size)
        status.copy_(own)
        gradient = values[:, self.flat.header : self.flat.row_length]
        if gradient.numel():
            low, high = torch.aminmax(gradient, dim=1)
            nonfinite = ~(torch.isfinite(low) & torch.isfinite(high))
            column = self._columns["nonfinite"]
            status[:, column] |= nonfinite.to(status.dtype)

    def replay(
        self,
        tau: int,
        n: int,
        status: RoundStatus,
        apply_update: UpdateFn,
        extrapolate_update: UpdateFn | None = None,
    ) -> RoundResult:
        """Replay the first ``n`` slots' gradients from the anchor and slide the window (see
        :meth:`PicardWindow.run_round`); the module then holds the new anchor."""
        gathered = self._gathered
        start = self._status
        rows = [self.ownership.gathered_row(j) for j in range(n)]
        self.last_result = self.window.run_round(
            tau,
            n,
            gradient_row=lambda j: gathered[rows[j], start:],  # type: ignore[index]
            apply_update=apply_update,
            snapshot=self.snapshot,
            presence=status.presence[:n],
            extrapolate_update=extrapolate_update,
        )
        return self.last_result

    def abort(self) -> bool:
        """After an exception: the anchor back into the module and optimizer (see :meth:`PicardWindow.abort_round`)."""
        return self.window.abort_round()


def _integers(values: torch.Tensor) -> torch.Tensor:
    """``values`` viewed as integers of the same width: the status columns hold exact integers in any dtype."""
    return values.view(_INTEGER_VIEW[values.element_size()])


def _checksum(anchor: torch.Tensor, columns: int) -> torch.Tensor:
    """A checksum of the anchor's bits as ``columns`` integers below 2**15, on the device (no host sync)."""
    total = _integers(anchor).sum(dtype=torch.int64)
    shifts = torch.arange(columns, device=anchor.device, dtype=torch.int64) * 15
    return (total >> shifts) & 0x7FFF


def _has_nonfinite(values: torch.Tensor) -> torch.Tensor:
    """Whether ``values`` holds a NaN or an infinity, on the device, without a ``values``-sized temporary."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)  # NaN propagates to both, ±inf to one of them
    return ~(torch.isfinite(low) & torch.isfinite(high))
