"""A copy of an optimizer's state (and its LR schedulers') that a Picard round returns to."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch


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
        """Copy the optimizer's current state (one ``_foreach_copy_`` over every state tensor when the buffers
        of the previous capture fit)."""
        previous = self._state or {}
        self._state = _copy_states(self.optimizer.state, previous)
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
        current.update(_copy_states(self._state, current))
        for group, saved in zip(self.optimizer.param_groups, self._groups):
            group.update({k: _clone(v) for k, v in saved.items()})
        for scheduler, saved in zip(self.schedulers, self._scheduler_states):
            scheduler.load_state_dict(copy.deepcopy(saved))


def _copy_states(
    source: Mapping[Any, dict[str, Any]], reuse: Mapping[Any, dict[str, Any]]
) -> dict[Any, dict[str, Any]]:
    """A copy of the per-parameter optimizer states in ``source`` (empty ones left out), written into ``reuse``'s
    tensors where they match; the matching tensors are copied by one ``_foreach_copy_`` per device and dtype."""
    copies: dict[Any, dict[str, Any]] = {}
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for p, state in source.items():
        if not state:
            continue
        into = reuse.get(p)
        if into is not None and _same_layout(state, into):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    targets.append(into[k])
                    sources.append(v)
                else:
                    into[k] = copy.deepcopy(v)
            copies[p] = into
        else:
            copies[p] = {k: _clone(v) for k, v in state.items()}
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for target, value in zip(targets, sources):
        pair = groups.setdefault((target.device, target.dtype), ([], []))
        pair[0].append(target)
        pair[1].append(value)
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    for group_targets, group_sources in groups.values():
        if foreach_copy is not None:
            foreach_copy(group_targets, group_sources)
        else:
            for target, value in zip(group_targets, group_sources):
                target.copy_(value)
    return copies


def _same_layout(source: dict[str, Any], reuse: dict[str, Any]) -> bool:
    """Whether ``reuse`` has the keys of ``source`` and a tensor of the same shape, dtype and device for each."""
    if reuse.keys() != source.keys():
        return False
    return all(
        isinstance(reuse[k], torch.Tensor)
        and reuse[k].shape == v.shape
        and reuse[k].dtype == v.dtype
        and reuse[k].device == v.device
        for k, v in source.items()
        if isinstance(v, torch.Tensor)
    )


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
