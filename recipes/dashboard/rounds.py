"""Per-round, per-slot convergence data of a Picard run: read from the strategy, kept in ``picard_rounds.csv``.

The plugin logs only aggregates (``picard/error_median``, ``picard/error_max``, …); the convergence heat map needs
every slot's error in every round. :func:`last_round` is the one place that reads them from the strategy, and
:class:`RoundRecorder` (a callback) appends one row per round to ``RUN/picard_rounds.csv``::

    round,step,skip,threshold,error_1,…,error_W

``step`` is τ, the anchor's optimizer step before the round; ``error_j`` compares the guess of step τ + j with its
replayed value (empty when the round was shorter than the window, at the end of a run).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

ROUNDS_FILE = "picard_rounds.csv"


@dataclass(frozen=True)
class RoundRecord:
    """One Picard round: ``round`` (0-based), ``step`` (τ before it), ``skip`` (steps accepted), ``threshold``
    (after the round's update) and ``errors`` (slot 1 … n, in the strategy's error units)."""

    round: int
    step: int
    skip: int
    threshold: float
    errors: tuple[float, ...]


def last_round(trainer: pl.Trainer) -> Any | None:
    """The :class:`lightning_picard.window.RoundResult` of the round that just ended (``strategy.last_round``), or
    None (a sequential run, or before the first round)."""
    return getattr(trainer.strategy, "last_round", None)


class RoundRecorder(pl.Callback):
    """Append every Picard round's per-slot errors to ``RUN/picard_rounds.csv`` (rank 0; nothing in sequential runs).

    Args:
        filename: the file, relative to the Trainer's ``default_root_dir`` (the run folder). Default is
            ``"picard_rounds.csv"``.
    """

    def __init__(self, filename: str = ROUNDS_FILE) -> None:
        self.filename = filename
        self.records: list[RoundRecord] = []
        self._seen: Any | None = None
        self._width = 0
        self._round_offset = 0
        self._fresh = True

    def path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._width = int(getattr(trainer.strategy, "window_size", 0) or 0)
        window = getattr(trainer.strategy, "window", None)
        self._round_offset = int(getattr(window, "rounds", 0) or 0)  # rounds before a resume
        self.records = []
        self._seen = None
        path = self.path(trainer)
        resumed = self._round_offset > 0 and path.exists() and _header_width(path) == self._width
        self._fresh = not resumed  # a new run, or a resume with another window: a new file

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        result = last_round(trainer)
        if result is None or result is self._seen:
            return
        self._seen = result
        record = RoundRecord(
            round=self._round_offset + len(self.records),
            step=int(result.window_start),
            skip=int(result.skip),
            threshold=float(result.threshold),
            errors=tuple(float(e) for e in result.errors),
        )
        self.records.append(record)
        self._append(trainer, record)

    @rank_zero_only
    def _append(self, trainer: pl.Trainer, record: RoundRecord) -> None:
        path = self.path(trainer)
        width = max(self._width, len(record.errors))
        new, self._fresh = self._fresh, False
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w" if new else "a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(
                    ["round", "step", "skip", "threshold", *(f"error_{j + 1}" for j in range(width))]
                )
            errors = [repr(e) for e in record.errors] + [""] * (width - len(record.errors))
            writer.writerow([record.round, record.step, record.skip, repr(record.threshold), *errors])


def _header_width(path: Path) -> int:
    with path.open(newline="") as file:
        header = next(csv.reader(file), [])
    return sum(name.startswith("error_") for name in header)


def read_rounds(path: str | Path) -> list[RoundRecord]:
    """The rounds of a ``picard_rounds.csv`` (``[]`` if the file does not exist: a sequential run)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    records = []
    for row in rows:
        errors = tuple(float(v) for k, v in row.items() if k.startswith("error_") and v not in ("", None))
        records.append(
            RoundRecord(
                int(row["round"]), int(row["step"]), int(row["skip"]), float(row["threshold"]), errors
            )
        )
    return records


def error_matrix(records: Sequence[RoundRecord]) -> list[list[float]]:
    """``[rounds][slots]`` errors, NaN-padded to the widest round."""
    width = max((len(r.errors) for r in records), default=0)
    return [[*r.errors, *([math.nan] * (width - len(r.errors)))] for r in records]
