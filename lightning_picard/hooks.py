"""What a LightningModule may implement to tell Picard about state beyond its Adam-updated parameters.

All hooks are optional; a module that defines none is trained as one fixed vector of parameters. The docs page
"Writing a Picard-ready LightningModule" has a worked example of each.

``picard_local_parameters() -> Iterable[torch.nn.Parameter]``
    Trainable parameters that are *not* Picard state: each rank keeps its own copy, which is never gathered,
    replayed or compared (ProlificDreamer's LoRA, as in the paper). The module owns their optimizer and steps
    it itself, typically in ``on_after_backward``: under :class:`~lightning_picard.PicardStrategy` that hook runs
    on the evaluating rank right after every slot evaluation (so a rank steps its copy once per slot it
    evaluates, speculative ones included); in a sequential run it runs once per step. They must not be in the
    optimizer returned by ``configure_optimizers``. They are part of ``state_dict``, so a checkpoint holds rank
    0's copy, and resuming loads it on every rank; save the local optimizer's state in ``on_save_checkpoint``
    if you need it restored too.

``picard_after_optimizer_step(step: int) -> Mapping[str, Tensor] | None``
    Runs right after the optimizer step (and step-interval LR schedulers) of step ``step``, the value
    ``global_step`` had in that step's ``training_step`` (DreamGaussian's 1-based counter is ``step + 1``,
    which is ``trainer.global_step`` inside the hook). Under Picard it runs only inside the replay, on every
    rank, so every rank makes the same change (not when ``init="extrapolate"`` extrapolates guesses past the
    window); in a sequential run the :class:`~lightning_picard.StepSeed` callback runs it at the same point
    and checks its report. It must be a deterministic function of the module's state, the
    optimizer's state, ``step`` and the step's gradients (still in ``.grad``): global RNGs are seeded for it
    from ``(seed, step)``. Use it to

    - change dimensions (densify/prune 3D Gaussians): resize parameters **in place** (``param.data = new_rows``;
      keep the Parameter objects), resize their optimizer state as the sequential code does, and return
      ``{name: parents}`` for every parameter, Picard buffer or step output whose rows changed (in number or
      order; a prune plus a clone may keep the count), where ``parents[i]`` is the row of the old tensor that
      new row ``i`` descends from (a pruned row has no descendant, a clone or split child points at its parent);
    - update step-dependent buffers (occupancy grids every k steps, progressive masks, densification
      statistics) declared by ``picard_buffers``.

    It must not change other state: a buffer or tensor attribute it modifies in place, replaces, adds or removes
    without declaring it raises an error naming it (under Picard the change would happen only in the replay, so
    guesses and slot evaluations would never see it).

``picard_step_outputs() -> Iterable[str]``
    Module buffers that ``training_step`` (or a backward hook) writes for the step hook of the *same* step to
    read: per-step data that is not a parameter gradient, such as 3D Gaussians' screen-space gradient norms and
    radii. Under Picard each slot's values are gathered with its gradient and put back in place before that step
    is replayed (mapped like gradients when the slot was evaluated on other rows; report them in resizes like
    any per-row buffer). They travel in the gradient rows, in the parameters' dtype.

``picard_buffers() -> Mapping[str, bool | float]``
    Module buffers (full dotted names, as in ``named_buffers``) that are Picard state: each guess carries its
    own copy, slot evaluations see the guess's buffers, and the replay restarts from the anchor's. The value
    says whether the buffer's difference counts in the Picard error (as ``‖Δ‖²`` over its elements, next to
    the parameters'), or with what weight (a float ≥ 0; ``True`` is 1); buffers that are functions of the
    parameters and the step need not count. With ``error_units="step"`` each counted buffer is measured
    against its own change per step, so counts and statistics in other units than the parameters do not
    dominate the error.

``picard_training_step_slots(slots: list[PicardSlot]) -> Sequence[Tensor | dict | None]``
    Evaluates several window slots of one rank as one batch, in place of one ``training_step`` per slot (only
    when a rank has more than one slot in a round: ``window_size > world_size / slot_group_size``). Each
    :class:`~lightning_picard.slots.PicardSlot` carries its step, batch, ``batch_idx``, seed and its own leaf
    tensors of the Picard parameters (the slot's guess) and copies of the Picard buffers and step outputs; inside
    ``with slot:`` the module's attributes are those tensors and ``global_step``, the RNGs, ``self.log`` and
    ``trainer.should_stop`` are the slot's step's. Return one ``training_step`` output per slot, in the order
    given; the strategy runs one backward of their sum (each slot's loss must depend on its own slot's tensors
    only) and hands each slot's gradient to the round. Setting it to ``None`` turns it off. Not with
    ``picard_local_parameters``. The page "Writing a Picard-ready LightningModule" gives the exact contract.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_picard import rng
from lightning_picard.resize import resize_event

HOOK_STREAM = 1
"""RNG stream of ``picard_after_optimizer_step``, distinct from the step's ``training_step`` stream."""


def local_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's rank-local trainables (``picard_local_parameters()``), or ``[]`` if it declares none."""
    declare = getattr(module, "picard_local_parameters", None)
    if declare is None:
        return []
    parameters = list(declare())
    own = {id(p) for p in module.parameters()}
    foreign = [p for p in parameters if id(p) not in own]
    if foreign:
        raise ValueError(
            "picard_local_parameters() returned tensors that are not parameters of the module. Return parameters "
            "registered on the module (e.g. `self.lora.parameters()`)."
        )
    return parameters


def picard_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that are Picard state, with their names: trainable, and not declared rank-local."""
    local = {id(p) for p in local_parameters(module)}
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in local]


def picard_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that are Picard state: trainable, and not declared rank-local."""
    return [p for _, p in picard_named_parameters(module)]


def training_step_slots(module: torch.nn.Module) -> Callable[[list[Any]], Sequence[Any]] | None:
    """The module's ``picard_training_step_slots``, or ``None`` if it has none (or sets it to ``None``)."""
    hook = getattr(module, "picard_training_step_slots", None)
    return hook if callable(hook) else None


def check_training_step_slots(module: torch.nn.Module) -> None:
    """Raise ``ValueError`` if the module's ``picard_training_step_slots`` cannot be used with its other hooks."""
    if training_step_slots(module) is None:
        return
    if local_parameters(module):
        raise ValueError(
            "picard_training_step_slots cannot be combined with picard_local_parameters(): rank-local parameters "
            "are shared by every slot of the batch, so one backward would sum their gradients over the slots, and "
            "their optimizer would step on that sum. Set picard_training_step_slots = None (evaluate the slots one "
            "by one) or make those parameters Picard state."
        )


def picard_buffers(module: torch.nn.Module) -> dict[str, bool | float]:
    """The module's ``picard_buffers()`` as ``{name: weight in the error}`` (a bool or a weight ≥ 0), or ``{}``."""
    declare = getattr(module, "picard_buffers", None)
    if declare is None:
        return {}
    declared = declare()
    if not isinstance(declared, Mapping):
        raise TypeError(
            f"picard_buffers() must return a mapping {{buffer name: counted in the error}}, got "
            f"{type(declared).__name__}. Example: return {{'occupancy': False, 'grad_sum': True}}."
        )
    weights: dict[str, bool | float] = {}
    for name, weight in declared.items():
        if isinstance(weight, bool):
            weights[str(name)] = weight
        elif isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0:
            weights[str(name)] = float(weight)
        else:
            raise ValueError(
                f"picard_buffers() gives {name!r} the weight {weight!r}; use True/False or a finite weight >= 0 "
                "(its share of the Picard error, 1 = like a parameter)."
            )
    return weights


def picard_step_outputs(module: torch.nn.Module) -> list[str]:
    """The module's ``picard_step_outputs()`` as a list of buffer names, or ``[]``."""
    declare = getattr(module, "picard_step_outputs", None)
    if declare is None:
        return []
    declared = declare()
    if isinstance(declared, (str, Mapping)):
        raise TypeError(
            f"picard_step_outputs() must return buffer names (a list), got {type(declared).__name__}. Example: "
            "return ['means2d_grad_norm', 'radii']."
        )
    return [str(name) for name in declared]


def state_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Shapes of the module's Picard parameters, buffers and step outputs by name."""
    shapes = {name: p.shape for name, p in picard_named_parameters(module)}
    for name in [*picard_buffers(module), *picard_step_outputs(module)]:
        shapes[name] = module.get_buffer(name).shape
    return shapes


def run_after_optimizer_step(
    module: torch.nn.Module, seed: int, step: int, validate: bool = False
) -> Mapping[str, torch.Tensor] | None:
    """Run the module's ``picard_after_optimizer_step(step)`` with the RNGs seeded from ``(seed, step)``.

    With ``validate`` (sequential runs, where nobody else reads the report) the report is checked against the
    shapes before and after the hook, so protocol mistakes surface without Picard too.
    """
    hook = getattr(module, "picard_after_optimizer_step", None)
    if hook is None:
        return None
    before = state_shapes(module) if validate else None
    undeclared = undeclared_tensor_versions(module)
    with rng.step_rng(seed, step, stream=HOOK_STREAM):
        report = hook(step)
    changed = changed_tensors(undeclared, undeclared_tensor_versions(module))
    if changed:
        raise RuntimeError(
            f"picard_after_optimizer_step(step={step}) changed {changed}, which are not Picard state: under Picard "
            "the hook runs only in the replay, so the guesses and the slot evaluations would not see the change "
            "and the run would silently differ from the sequential one. Declare them in picard_buffers() (as "
            "registered buffers), or picard_step_outputs() if training_step writes them, or leave them unchanged "
            "in the hook."
        )
    if report is not None and not isinstance(report, Mapping):
        raise TypeError(
            f"picard_after_optimizer_step(step={step}) must return None or {{name: parents}}, got "
            f"{type(report).__name__}."
        )
    if before is not None:
        resize_event(report, step, before, state_shapes(module))
    return report or None


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
"""Attributes every ``nn.Module`` has (hook dicts, ``_buffers``, ``training``…): skipped when looking for tensors."""


def undeclared_tensor_versions(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """``{name: (tensor, version counter)}`` of the module's tensors that are not Picard state.

    Covered: registered buffers and plain tensor attributes of the module and of every submodule that had any when
    first looked at (the list of submodules is kept for the module's lifetime, so that a frozen guidance network of
    a thousand layers costs nothing per step), except the Picard buffers and step outputs; parameters are Picard
    state or rank-local and are not covered. Tensors created in inference mode have no version counter: only their
    identity is compared.
    """
    declared = set(picard_buffers(module)) | set(picard_step_outputs(module))
    versions: dict[str, tuple[torch.Tensor, int | None]] = {}
    for prefix, sub in _holders(module):
        dot = f"{prefix}." if prefix else ""
        for key, value in _tensors_of(sub):
            name = dot + key
            if name in declared:
                continue
            try:
                version: int | None = value._version
            except RuntimeError:  # an inference tensor
                version = None
            versions[name] = (value, version)
    return versions


_HOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[str, torch.nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _holders(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The module itself and its submodules that hold buffers or tensor attributes, found once per module."""
    holders = _HOLDERS.get(module)
    if holders is None:
        holders = [
            (p, sub)
            for p, sub in module.named_modules()
            if sub is module or any(True for _ in _tensors_of(sub))
        ]
        _HOLDERS[module] = holders
    return holders


def _tensors_of(sub: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    attributes = vars(sub)
    tensors = [(key, value) for key, value in sub._buffers.items() if value is not None]
    for key in attributes.keys() - _MODULE_INTERNALS:
        value = attributes[key]
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            tensors.append((key, value))
    return tensors


def changed_tensors(
    before: Mapping[str, tuple[torch.Tensor, int | None]],
    after: Mapping[str, tuple[torch.Tensor, int | None]],
) -> list[str]:
    """Names whose tensor was modified in place, replaced, added or removed between two
    :func:`undeclared_tensor_versions` readings."""
    changed = []
    for name in before.keys() | after.keys():
        old, new = before.get(name), after.get(name)
        if old is None or new is None or old[0] is not new[0] or old[1] != new[1]:
            changed.append(name)
    return sorted(changed)
