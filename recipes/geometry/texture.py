"""A colour field on surfaces: the hash grid and feature MLP of a NeRF field without its density.

Magic3D's refine stage and ProlificDreamer's texture stage colour a DMTet mesh with it, queried at the
rasterized surface points. Its parts carry the names of :class:`~recipes.geometry.nerf.ImplicitVolume`'s
(``encoding``, ``feature_network``), so a coarse field's texture can be inherited parameter for parameter
(:meth:`TextureField.inherit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.mlp import MLP, MLPConfig
from recipes.geometry.nerf import points_to_unit_cube


@dataclass
class TextureFieldConfig:
    """Texture field settings (threestudio's ``tetrahedra-sdf-grid`` texture: the implicit-volume encoding).

    Attributes:
        encoding: the hash grid. Default is threestudio's.
        mlp: the feature decoder. Default is threestudio's (64 neurons, 1 hidden layer).
        radius: the field spans ``[-radius, radius]^3``. Default is 1.
        n_feature_dims: features per point (3: RGB before the material's activation). Default is 3.
    """

    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    radius: float = 1.0
    n_feature_dims: int = 3


class TextureField(nn.Module):
    """Hash grid + MLP → material features at world points ``[..., 3]``."""

    def __init__(self, config: TextureFieldConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else TextureFieldConfig()
        self.encoding = HashGridEncoding(config.encoding)
        self.feature_network = MLP(self.encoding.n_output_dims, config.n_feature_dims, config.mlp)

    def forward(self, points: Tensor) -> Tensor:
        encoded = self.encoding(points_to_unit_cube(points, self.config.radius))
        return self.feature_network(encoded)

    @torch.no_grad()
    def inherit(self, source: nn.Module) -> None:
        """Copy the parameters of ``source``'s ``encoding`` and ``feature_network`` (a NeRF, SDF or texture field).

        Raises ``ValueError`` when their shapes or the field's box differ from this field's.
        """
        ours = {name: p for name, p in self.named_parameters()}
        theirs = {
            name: p
            for name, p in source.named_parameters()
            if name.split(".")[0] in ("encoding", "feature_network")
        }
        shapes = {name: tuple(p.shape) for name, p in ours.items()}
        given = {name: tuple(p.shape) for name, p in theirs.items()}
        radius = self.config.radius
        source_radius = (
            source.config.radius if isinstance(source, TextureField) else getattr(source, "radius", None)
        )
        if shapes != given or source_radius != radius:
            raise ValueError(
                f"the texture field cannot inherit the coarse field's colour: its parameters {given} and radius "
                f"{source_radius} differ from {shapes} and {radius}; set scene.texture's "
                "radius, encoding and mlp to the coarse stage's field settings, or scene.inherit_texture: false"
            )
        for name, parameter in ours.items():
            parameter.copy_(theirs[name])
