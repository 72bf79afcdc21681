"""The small bias-free ReLU MLP that decodes hash-grid features (threestudio's ``VanillaMLP``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class MLPConfig:
    """Hidden width and depth of a decoder MLP (threestudio: 64 neurons, 1 hidden layer)."""

    n_neurons: int = 64
    n_hidden_layers: int = 1


class MLP(nn.Module):
    """``n_hidden_layers`` bias-free Linear+ReLU layers and a bias-free linear output layer."""

    def __init__(self, n_input: int, n_output: int, config: MLPConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else MLPConfig()
        layers: list[nn.Module] = []
        width = n_input
        for _ in range(config.n_hidden_layers):
            layers += [nn.Linear(width, config.n_neurons, bias=False), nn.ReLU(inplace=True)]
            width = config.n_neurons
        layers.append(nn.Linear(width, n_output, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
