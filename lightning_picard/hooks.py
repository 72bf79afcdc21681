"""What a LightningModule may implement to tell Picard about state beyond its Adam-updated parameters.

All hooks are optional; a module that defines none is trained as one fixed vector of parameters.

``picard_local_parameters() -> Iterable[torch.nn.Parameter]``
    Trainable parameters that are *not* Picard state: each rank keeps its own copy, which is never gathered,
    replayed or compared (ProlificDreamer's LoRA, as in the paper). The module owns their optimizer and steps
    it itself, typically in ``on_after_backward``: under :class:`~lightning_picard.PicardStrategy` that hook runs
    on the evaluating rank right after every slot evaluation (so a rank steps its copy once per slot it
    evaluates, speculative ones included); in a sequential run it runs once per step. They must not be in the
    optimizer returned by ``configure_optimizers``. They are part of ``state_dict``, so a checkpoint holds rank
    0's copy, and resuming loads it on every rank; save the local optimizer's state in ``on_save_checkpoint``
    if you need it restored too.
"""

from __future__ import annotations

import torch


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


def picard_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that are Picard state: trainable, and not declared rank-local."""
    local = {id(p) for p in local_parameters(module)}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in local]
