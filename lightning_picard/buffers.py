"""Module buffers that are Picard state: step-dependent buffers and step outputs.

Step-dependent buffers (``picard_buffers()``) travel with the anchor and every guess. Step outputs
(``picard_step_outputs()``) are buffers that ``training_step`` writes for the step hook of the same step to read
(3D Gaussians' screen-space gradient norms and radii): they also travel with the rows, and in addition each slot's
values are gathered with its gradient and put back in place before that step is replayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lightning_picard.resize import unproject


class ModuleBuffers:
    """Reads and writes a module's Picard buffers by name.

    Args:
        module: the module owning the buffers.
        in_error: buffer name → its weight in the Picard error (``True`` is 1, ``False`` or 0 leaves it out).
        outputs: names of the step outputs (carried like buffers, never in the error, and gathered per slot).
    """

    def __init__(
        self, module: torch.nn.Module, in_error: Mapping[str, bool | float], outputs: Sequence[str] = ()
    ) -> None:
        self.module = module
        self.outputs = list(outputs)
        both = sorted(set(in_error) & set(self.outputs))
        if both:
            raise ValueError(
                f"{both} are named by both picard_buffers() and picard_step_outputs(); a step output is written by "
                "training_step and read by the step hook of the same step, a Picard buffer is state that carries "
                "over. Name each buffer in one of them."
            )
        self.in_error = {**dict(in_error), **dict.fromkeys(self.outputs, False)}
        self.weights = {name: float(weight) for name, weight in self.in_error.items() if float(weight) > 0}
        """The counted buffers and their weights in the error."""
        for name in self.in_error:
            hook = "picard_step_outputs()" if name in self.outputs else "picard_buffers()"
            try:
                module.get_buffer(name)
            except AttributeError as error:
                raise ValueError(
                    f"{hook} names {name!r}, which is not a buffer of the module. Register it with "
                    f"register_buffer and give its full dotted name (names: {_buffer_names(module)[:8]})."
                ) from error

    @property
    def names(self) -> list[str]:
        return list(self.in_error)

    def live(self) -> dict[str, torch.Tensor]:
        """The module's current buffer tensors (not copies)."""
        return {name: self.module.get_buffer(name) for name in self.in_error}

    def copy(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Copies of the current buffers, written into ``into``'s tensors where shapes match."""
        out = {} if into is None else into
        for name, value in self.live().items():
            _store(out, name, value)
        return out

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the module's buffers to ``values`` (in place when the shape is unchanged)."""
        for name, value in values.items():
            current = self.module.get_buffer(name)
            if current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)
            else:
                owner, _, leaf = name.rpartition(".")
                setattr(self.module.get_submodule(owner), leaf, value.clone())

    def squared_difference(
        self, other: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, float]:
        """Σ weight·‖current − other‖² over the counted buffers (float64 on the device) and Σ weight·numel.

        ``maps`` gives, for resized buffers, the row of ``other`` standing for each current row (``unproj``).
        """
        total, size = None, 0.0
        for name, term, numel in self.squared_differences(other, maps):
            weight = self.weights[name]
            term = term if weight == 1.0 else weight * term
            total = term if total is None else total + term
            size += weight * numel
        return total, size

    def squared_differences(
        self, other: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor] | None = None
    ) -> list[tuple[str, torch.Tensor, int]]:
        """``(name, ‖current − other‖², numel)`` of every counted buffer, unweighted (NaN where shapes differ)."""
        out = []
        for name in self.weights:
            current = self.module.get_buffer(name)
            theirs = other[name]
            if maps is not None and name in maps:
                theirs = unproject(theirs.to(torch.float64), maps[name], missing=math.nan)
            if current.shape != theirs.shape:
                term = torch.tensor(float("nan"), dtype=torch.float64, device=current.device)
            else:
                term = (current.to(torch.float64) - theirs.to(torch.float64)).square().sum()
            out.append((name, term, current.numel()))
        return out

    def outputs_numel(self, values: Mapping[str, torch.Tensor]) -> int:
        """Number of step-output values in a row's buffers (what a gathered row holds after the gradients)."""
        return sum(values[name].numel() for name in self.outputs)

    def write_outputs(self, segment: torch.Tensor) -> None:
        """Copy the module's current step outputs, flattened in order, into the start of ``segment``."""
        offset = 0
        for name in self.outputs:
            value = self.module.get_buffer(name)
            segment[offset : offset + value.numel()].copy_(value.reshape(-1))
            offset += value.numel()

    def load_outputs(
        self,
        segment: torch.Tensor,
        shapes: Mapping[str, torch.Size],
        maps: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Set the step outputs from ``segment`` (written by :meth:`write_outputs` in ``shapes``), mapped onto
        the current rows through ``maps`` where a slot was evaluated on rows of another lineage."""
        offset = 0
        for name in self.outputs:
            shape = shapes[name]
            current = self.module.get_buffer(name)
            value = segment[offset : offset + shape.numel()].view(shape).to(current.dtype)
            offset += shape.numel()
            if maps is not None and name in maps:
                value = unproject(value, maps[name])
            self.load({name: value})


def copy_buffers(
    values: Mapping[str, torch.Tensor], into: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Copies of ``values``, written into ``into``'s tensors where shapes match."""
    out = {} if into is None else into
    for name, value in values.items():
        _store(out, name, value)
    for name in [k for k in out if k not in values]:
        del out[name]
    return out


def _store(out: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    existing = out.get(name)
    if existing is not None and existing.shape == value.shape and existing.dtype == value.dtype:
        existing.copy_(value)
    else:
        out[name] = value.detach().clone()


def _buffer_names(module: torch.nn.Module) -> list[str]:
    return [name for name, _ in module.named_buffers()]
