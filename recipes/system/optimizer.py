"""The Adam(W) settings every scene's optimizer shares, and the optimizer over named parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class AdamSettings:
    """Adam or AdamW, as threestudio configures them.

    Attributes:
        name: ``"adam"`` or ``"adamw"``. Default is ``"adam"``.
        betas: Adam's betas. Default is (0.9, 0.99).
        eps: Adam's epsilon. Default is 1e-15.
        weight_decay: AdamW's weight decay. Default is 0.
    """

    name: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0

    def build(self, groups: dict[str, tuple[Iterable[nn.Parameter], float]]) -> torch.optim.Optimizer:
        """The optimizer over ``{group name: (parameters, learning rate)}``, without frozen parameters or empty groups."""
        param_groups = []
        for name, (params, lr) in groups.items():
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                param_groups.append({"params": trainable, "lr": lr, "name": name})
        optimizer_class = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return optimizer_class(param_groups, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


__all__ = ["AdamSettings"]
