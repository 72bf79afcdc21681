"""Several window slots of one rank evaluated as one batch: what ``picard_training_step_slots`` receives.

When a rank evaluates more than one slot a round (more slots than slot groups), a module that implements
``picard_training_step_slots(slots)`` is handed all of them at once, so that it can run its expensive part (a
diffusion model's noise prediction) once over every slot's inputs. Each :class:`PicardSlot` carries the slot's
step, batch and ``batch_idx`` and its own copy of the Picard state: one leaf tensor per Picard parameter (the
slot's guess, ``requires_grad``) and a copy of every Picard buffer and step output. ``with slot:`` puts that state
into the module (the module's attributes are the slot's tensors inside the block; the Parameter objects are
restored on exit) and makes the block run as the slot's step: ``global_step``, the seeded RNGs and
:func:`~lightning_picard.step_generator`, ``self.log`` and ``trainer.should_stop`` are the step's.

The slots' losses are independent, so one backward of their sum gives each slot's leaves exactly that slot's
gradient; the loop then hands each gradient to the round as if the slot had been evaluated alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch

from lightning_picard import rng
from lightning_picard.flat import Layout

Activation = Callable[["PicardSlot"], AbstractContextManager[None]]
"""Makes a block run as a slot's step (the loop's part: ``global_step``, ``self.log``, ``should_stop``)."""


class PicardSlot:
    """One window slot of a batched evaluation (see :mod:`lightning_picard.slots`).

    Attributes:
        index: the slot ``j`` in the window (0 is the anchor's step τ).
        step: the optimizer step ``τ + j`` this slot evaluates (``global_step`` inside ``with slot:``).
        batch: the step's batch, on the device.
        batch_idx: the step's batch index in the epoch.
        seed: the step's seed (:func:`~lightning_picard.rng.step_seed` of the run's seed and ``step``: what the
            RNGs are seeded with inside ``with slot:``).
        parameters: Picard parameter name (as in ``named_parameters``) → the slot's guess as a leaf tensor with
            ``requires_grad``; its ``.grad`` after the backward is the slot's gradient.
        buffers: Picard buffer or step output name → the slot's own copy (what the module sees inside the block).
        stop: whether the slot's step set ``trainer.should_stop`` (set by the loop).
    """

    def __init__(
        self,
        index: int,
        step: int,
        batch: Any,
        batch_idx: int,
        run_seed: int,
        module: torch.nn.Module,
        parameters: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        activate: Activation,
    ) -> None:
        self.index = index
        self.step = step
        self.batch = batch
        self.batch_idx = batch_idx
        self.seed = rng.step_seed(run_seed, step)
        self._run_seed = run_seed
        self.parameters = dict(parameters)
        self.buffers = dict(buffers)
        self.stop = False
        self._module = module
        self._activate = activate
        self._stack: ExitStack | None = None

    def state(self) -> dict[str, torch.Tensor]:
        """The slot's parameters and buffers by name, e.g. for ``torch.func.functional_call``."""
        return {**self.parameters, **self.buffers}

    def generator(self, device: torch.device | str | None = None, offset: int = 0) -> torch.Generator:
        """The generator :func:`~lightning_picard.step_generator` gives inside this slot's step."""
        return rng.seeded_generator(self.seed, device, offset)

    def step_context(self) -> AbstractContextManager[None]:
        """The slot's step without its state in the module: seeded RNGs, ``global_step``, ``self.log``,
        ``should_stop`` (the loop runs the slot's backward hooks in it, with the slot's guess loaded)."""
        stack = ExitStack()
        stack.enter_context(rng.step_rng(self._run_seed, self.step))
        stack.enter_context(self._activate(self))
        return stack

    def __enter__(self) -> PicardSlot:
        if self._stack is not None:
            raise RuntimeError(
                f"slot {self.index} (step {self.step}) is already entered; enter it once at a time"
            )
        stack = ExitStack()
        try:
            stack.enter_context(self.step_context())
            stack.enter_context(bind(self._module, self.parameters, self.buffers))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return stack.__exit__(*exc_info)

    def gradients(self) -> list[torch.Tensor | None]:
        """The slot's gradient of each parameter, in ``parameters`` order (``None`` where it received none)."""
        return [leaf.grad for leaf in self.parameters.values()]


def slot_state(
    values: torch.Tensor,
    layout: Layout,
    names: list[str],
    buffers: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A slot's own state from its window row: one leaf per parameter (views of one copy of ``values`` in
    ``layout``, each ``requires_grad``), and copies of the row's ``buffers``."""
    copy = values.detach().clone()
    parameters: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in zip(names, layout):
        numel = shape.numel()
        parameters[name] = copy[offset : offset + numel].view(shape).detach().requires_grad_(True)
        offset += numel
    return parameters, {name: value.detach().clone() for name, value in buffers.items()}


@contextmanager
def bind(
    module: torch.nn.Module, parameters: Mapping[str, torch.Tensor], buffers: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Make the module's parameters and buffers named in the mappings be the given tensors for the block.

    The entries are swapped in the submodules' ``_parameters``/``_buffers`` dictionaries, so the order of
    ``named_parameters()`` and the Parameter objects are unchanged afterwards. A buffer the block reassigns
    (``self.radii = new``) is written back into ``buffers`` on exit, so the slot keeps its latest value.
    """
    saved: list[tuple[str, dict[str, Any], str, Any]] = []
    try:
        for table, values in (("_parameters", parameters), ("_buffers", buffers)):
            for name, value in values.items():
                owner, _, leaf = name.rpartition(".")
                entries = getattr(module.get_submodule(owner), table)
                if leaf not in entries:
                    kind = "parameter" if table == "_parameters" else "buffer"
                    raise ValueError(f"the module has no {kind} {name!r} to bind a slot's tensor to")
                saved.append((name, entries, leaf, entries[leaf]))
                entries[leaf] = value
        yield
    finally:
        for name, entries, leaf, original in reversed(saved):
            if name in buffers and entries.get(leaf) is not None:
                buffers[name] = entries[leaf]
            entries[leaf] = original
