"""Changing dimensions: the parent-index maps of resize events and the ``unproj`` they define.

A module whose tensors change size (3D Gaussians densified and pruned) reports each change as
``{name: parents}``: row ``i`` of the new tensor ``name`` descends from row ``parents[i]`` of the old one
(a clone or split child points at its parent; a pruned row has no descendant). A :class:`ResizeEvent` records
one such change at one step, and a :data:`Lineage` is the sequence of events between the window's anchor and a
state. Two states that share the anchor relate through their lineages: :func:`row_maps` says, for each row of
one, which row of the other stands for it (``unproj``: children take their parent's values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

_MISSING = -1


@dataclass(frozen=True, eq=False)
class ResizeEvent:
    """Tensors resized after the optimizer step of ``step``.

    Attributes:
        step: the optimizer step after which the change happened.
        parents: tensor name → ``[new rows]`` int64 index of the parent row in the old tensor.
        rows_before: tensor name → number of rows before the change.
    """

    step: int
    parents: Mapping[str, torch.Tensor]
    rows_before: Mapping[str, int]

    def same_as(self, other: ResizeEvent) -> bool:
        """Whether both events made the same change at the same step (one host sync per tensor)."""
        if self is other:
            return True
        return (
            self.step == other.step
            and self.rows_before == other.rows_before
            and self.parents.keys() == other.parents.keys()
            and all(torch.equal(self.parents[k], other.parents[k]) for k in self.parents)
        )


Lineage = tuple[ResizeEvent, ...]
"""The resize events between the window's anchor and a state, oldest first."""


def rebase(lineage: Lineage, anchor_step: int) -> Lineage:
    """The lineage relative to a new anchor at ``anchor_step``: events of earlier steps are part of the anchor."""
    return tuple(event for event in lineage if event.step >= anchor_step)


def row_maps(source: Lineage, target: Lineage) -> dict[str, torch.Tensor] | None:
    """For each tensor whose rows differ between two states, the source row that stands for each target row.

    Both lineages start at the same anchor. ``None`` means the states have the same rows (identical lineages).
    Otherwise the result maps a tensor name to an int64 index ``[target rows]`` into the source rows, ``-1``
    where the source has no row of the same ancestry (it was pruned there). A target row takes the first
    source row descending from the same ancestor: the parent itself if it survived, else its first child.
    """
    common = 0
    while common < min(len(source), len(target)) and source[common].same_as(target[common]):
        common += 1
    if common == len(source) == len(target):
        return None
    source_events, target_events = source[common:], target[common:]
    names = {name for event in (*source_events, *target_events) for name in event.parents}
    maps = {}
    for name in sorted(names):
        rows_at_fork = next(
            e.rows_before[name] for e in (*source_events, *target_events) if name in e.parents
        )
        source_ancestor = _ancestors(source_events, name)
        target_ancestor = _ancestors(target_events, name)
        if source_ancestor is None:
            index = target_ancestor
        else:
            device = source_ancestor.device
            first = torch.full((rows_at_fork,), len(source_ancestor), dtype=torch.int64, device=device)
            rows = torch.arange(len(source_ancestor), device=device)
            first.scatter_reduce_(0, source_ancestor, rows, reduce="amin")
            first.masked_fill_(first == len(source_ancestor), _MISSING)  # no host sync, unlike a mask index
            index = first if target_ancestor is None else first[target_ancestor]
        assert index is not None
        maps[name] = index
    return maps


def _ancestors(events: Sequence[ResizeEvent], name: str) -> torch.Tensor | None:
    """For each row after ``events``, its ancestor row before them (``None``: the rows were not changed)."""
    ancestor = None
    for event in events:
        parents = event.parents.get(name)
        if parents is not None:
            ancestor = parents if ancestor is None else ancestor[parents]
    return ancestor


def unproject(values: torch.Tensor, index: torch.Tensor, missing: float = 0.0) -> torch.Tensor:
    """``values[index]`` along dim 0, with ``missing`` where ``index`` is ``-1``."""
    index = index.to(values.device)
    mapped = values[index.clamp_min(0)]
    absent = (index == _MISSING).view(-1, *([1] * (values.dim() - 1)))
    return mapped.masked_fill(absent, missing)  # no host sync (a mask index or .any() would need one)


def resize_event(
    report: Mapping[str, torch.Tensor] | None,
    step: int,
    before: Mapping[str, torch.Size],
    after: Mapping[str, torch.Size],
) -> ResizeEvent | None:
    """Validate a module's resize report against its tensors' shapes before and after the step hook.

    Args:
        report: what ``picard_after_optimizer_step(step)`` returned.
        step: the step whose hook ran.
        before, after: shapes of the Picard parameters, buffers and step outputs by name.

    Returns:
        The event, or ``None`` if nothing was reported.
    """
    report = dict(report or {})
    unknown = [name for name in report if name not in before]
    if unknown:
        raise ValueError(
            f"picard_after_optimizer_step(step={step}) reported resizing {unknown}, which are neither Picard "
            f"parameters nor Picard buffers or step outputs (known: {sorted(before)[:8]})."
        )
    for name in before:
        old, new = before[name], after[name]
        if old != new and (name not in report or old[1:] != new[1:]):
            what = "without reporting it" if name not in report else "beyond its first dimension"
            raise ValueError(
                f"{name!r} changed shape from {tuple(old)} to {tuple(new)} after step {step} {what}. Picard "
                "supports changing the number of rows (dim 0) of a tensor, reported by "
                "picard_after_optimizer_step as {name: parents}."
            )
    if not report:
        return None
    parents = {
        name: check_parents(name, value, _rows(before[name]), _rows(after[name]), step)
        for name, value in report.items()
    }
    return ResizeEvent(step, parents, {name: _rows(before[name]) for name in parents})


def _rows(shape: torch.Size) -> int:
    return shape[0] if len(shape) else 1


def check_parents(name: str, parents: object, rows_before: int, rows_after: int, step: int) -> torch.Tensor:
    """Validate one entry of a module's resize report; returns it as an int64 tensor."""
    where = f"picard_after_optimizer_step(step={step}) returned parents for {name!r}"
    if not isinstance(parents, torch.Tensor) or parents.dim() != 1 or parents.dtype.is_floating_point:
        raise ValueError(f"{where} that are not a 1-D integer tensor (got {parents!r:.80}).")
    if parents.numel() != rows_after:
        raise ValueError(
            f"{where} with {parents.numel()} entries, but the tensor now has {rows_after} rows: give one parent "
            "per new row."
        )
    low, high = torch.stack(torch.aminmax(parents)).tolist() if parents.numel() else (0, 0)  # one host read
    if low < 0 or high >= rows_before:
        raise ValueError(
            f"{where} outside [0, {rows_before}): parents index the rows the tensor had before the change."
        )
    return parents.to(torch.int64)
