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
    """The :class:`lightning_picard.window.RoundResult` of the round that just ended, or None (no Picard strategy).

    Plugin API this reads (requested from the plugin, see docs/recipes/dashboards.md): ``strategy.last_round``,
    the latest ``RoundResult`` (``window_start``, ``skip``, ``errors``, ``threshold``), set before the round's
    ``on_train_batch_end``. Until the plugin has it, :class:`_ReplayTap` provides the same value.
    """
    strategy = trainer.strategy
    if hasattr(strategy, "last_round"):
        return strategy.last_round
    tap = getattr(strategy, _ReplayTap.ATTRIBUTE, None)
    return tap.result if tap is not None else None


class _ReplayTap:
    """INTERIM, until the plugin exposes ``strategy.last_round``: wraps this strategy instance's
    ``round.replay`` (which returns the ``RoundResult``) to keep its latest result. Installed per instance, never on
    the class; removed by :meth:`remove`."""

    ATTRIBUTE = "_recipes_replay_tap"

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.round = strategy.round
        self.result: Any | None = None
        replay = self.round.replay

        def tapped(*args: Any, **kwargs: Any) -> Any:
            self.result = replay(*args, **kwargs)
            return self.result

        self.round.replay = tapped
        setattr(strategy, self.ATTRIBUTE, self)

    @classmethod
    def install(cls, strategy: Any) -> None:
        """Tap ``strategy`` if it runs Picard rounds and has no ``last_round`` of its own."""
        if hasattr(strategy, "last_round") or getattr(strategy, "round", None) is None:
            return
        tap = getattr(strategy, cls.ATTRIBUTE, None)
        if tap is None or tap.round is not strategy.round:
            cls(strategy)

    @classmethod
    def remove(cls, strategy: Any) -> None:
        tap = getattr(strategy, cls.ATTRIBUTE, None)
        if tap is not None:
            vars(tap.round).pop("replay", None)
            delattr(strategy, cls.ATTRIBUTE)


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
        _ReplayTap.install(trainer.strategy)
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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _ReplayTap.remove(trainer.strategy)


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
