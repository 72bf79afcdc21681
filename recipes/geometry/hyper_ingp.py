"""Hyper-iNGP (ScaleDreamer): one shared hash grid, and the prompt's pooled text embedding predicting the weights
of the small MLPs that decode it.

Per prompt, a hypernetwork ``Linear(D → hidden, no bias) → LayerNorm → SiLU → Linear(hidden → P)`` (ATT3D's
choice of activation; Xavier-normal weights, zero biases) outputs the P numbers of two bias-free two-layer ReLU
MLPs over the grid's features: SDF ``F → W → 1`` and features ``F → W → n_feature_dims``. With ScaleDreamer's sizes
(D = 1024 pooled SD-2.1 embedding, hidden 64, F = 32 from 16 levels × 2 features, W = 64, 3 features) P = 4,352
and the hypernetwork has 348,544 parameters; the grid is the same for every prompt and is not modulated by the
text (the reverse of ATT3D). The SDF gets the sphere bias ``‖x‖ − r`` (ScaleDreamer's 0.5 for Hyper-iNGP) and
starts as that sphere (the grid starts at ±1e-4, so the predicted MLPs output almost 0).

Rendering: the generated field is a signed distance, rendered by the NeuS renderer with a fixed sharpness (see
:class:`recipes.system.amortized.AmortizedScene`); normals are central finite differences of the SDF
(ScaleDreamer's ``finite_difference``, eps 0.01 by default) and feed the eikonal loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.nerf import FieldOutput, points_to_unit_cube
from recipes.geometry.sdf import sdf_field_output


@dataclass
class HyperINGPConfig:
    """Hyper-iNGP sizes (ScaleDreamer's ``asd_sd_hyper_iNGP_50k.yaml``; the CPU configs shrink them).

    Attributes:
        embedding_dim: D, the pooled text embedding's size. Default is 1024 (SD 2.1's CLIP).
        hypernet_hidden: width of the hypernetwork's hidden layer. Default is 64.
        mlp_width: W, hidden width of the predicted SDF and feature MLPs. Default is 64.
        n_feature_dims: features the material reads (3: RGB before the sigmoid). Default is 3.
        radius: the scene box ``[-radius, radius]^3``. Default is 2.0 (ScaleDreamer: "nan for 1.0").
        sphere_radius: the SDF's sphere bias ``‖x‖ − sphere_radius`` (world units). Default is 0.5.
        finite_difference_eps: step of the central-difference normals (world units). Default is 0.01.
        encoding: the shared hash grid. Default is threestudio's (16 levels × 2 features, 2^19 entries, 16 → 4096).
    """

    embedding_dim: int = 1024
    hypernet_hidden: int = 64
    mlp_width: int = 64
    n_feature_dims: int = 3
    radius: float = 2.0
    sphere_radius: float = 0.5
    finite_difference_eps: float = 0.01
    encoding: HashGridConfig = field(default_factory=HashGridConfig)


class LinearHyperNetwork(nn.Module):
    """``Linear(D → hidden, no bias) → LayerNorm → SiLU → Linear(hidden → n_outputs)``, run in float32."""

    def __init__(self, embedding_dim: int, hidden: int, n_outputs: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, hidden, bias=False),
            nn.LayerNorm(hidden),
            nn.SiLU(),
            nn.Linear(hidden, n_outputs),
        )
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, embedding: Tensor) -> Tensor:
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            return self.layers(embedding.float())


class HyperINGP(nn.Module):
    """The Hyper-iNGP generator (:class:`~recipes.geometry.amortized.AmortizedGenerator`); takes no noise.

    Args:
        config: sizes. Default is ScaleDreamer's (:class:`HyperINGPConfig`).
    """

    noise_dim = 0

    def __init__(self, config: HyperINGPConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else HyperINGPConfig()
        self.encoding = HashGridEncoding(config.encoding)
        features, width = self.encoding.n_output_dims, config.mlp_width
        self.shapes = {
            "sdf_hidden": (features, width),
            "sdf_out": (width, 1),
            "feature_hidden": (features, width),
            "feature_out": (width, config.n_feature_dims),
        }
        n_outputs = sum(rows * cols for rows, cols in self.shapes.values())
        self.hypernet = LinearHyperNetwork(config.embedding_dim, config.hypernet_hidden, n_outputs)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def radius(self) -> float:
        return self.config.radius

    def update_step(self, step: int) -> None:
        """The shared grid's progressive band mask for ``step``."""
        self.encoding.update_step(step)

    def condition(
        self, embedding: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> HyperINGPField:
        """The field of the prompt with pooled embedding ``embedding [D]`` (``noise`` must be None; Hyper-iNGP
        draws nothing, so ``generator`` is unused)."""
        if noise is not None and noise.numel() > 0:
            raise ValueError("Hyper-iNGP takes no noise (noise_dim is 0)")
        if embedding.shape != (self.embedding_dim,):
            raise ValueError(
                f"Hyper-iNGP expects one pooled embedding [{self.embedding_dim}], got {tuple(embedding.shape)}; set "
                "the generator's embedding_dim to the text encoder's"
            )
        flat = self.hypernet(embedding[None])[0]
        weights, start = {}, 0
        for name, (rows, cols) in self.shapes.items():
            weights[name] = flat[start : start + rows * cols].reshape(rows, cols)
            start += rows * cols
        return HyperINGPField(self, weights)


class HyperINGPField:
    """One prompt's field: the shared grid decoded by that prompt's predicted MLPs (a
    :class:`~recipes.geometry.amortized.ConditionedField`)."""

    def __init__(self, generator: HyperINGP, weights: dict[str, Tensor]) -> None:
        self.generator = generator
        self.weights = weights
        self.radius = generator.radius

    def update_step(self, step: int) -> None:
        self.generator.update_step(step)

    def _decode(self, encoded: Tensor, hidden: str, out: str) -> Tensor:
        return torch.relu(encoded @ self.weights[hidden]) @ self.weights[out]

    def _sdf_and_encoding(self, points: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.generator.config
        encoded = self.generator.encoding(points_to_unit_cube(points, self.radius)).float()
        sdf = self._decode(encoded, "sdf_hidden", "sdf_out")[..., 0] + points.norm(dim=-1) - cfg.sphere_radius
        return sdf, encoded

    def sdf(self, points: Tensor) -> Tensor:
        return self._sdf_and_encoding(points)[0]

    def __call__(self, points: Tensor, with_normal: bool = True) -> FieldOutput:
        return sdf_field_output(
            points,
            self._sdf_and_encoding,
            lambda encoded: self._decode(encoded, "feature_hidden", "feature_out"),
            "finite_difference",
            self.generator.config.finite_difference_eps,
        )


__all__ = ["HyperINGP", "HyperINGPConfig", "HyperINGPField", "LinearHyperNetwork"]
