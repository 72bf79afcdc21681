"""A copy of an optimizer's state (and its LR schedulers') that a Picard round returns to."""

from __future__ import annotations

import copy
from collections.abc import Sequence
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
