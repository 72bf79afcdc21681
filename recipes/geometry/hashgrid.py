"""Multiresolution hash-grid encoding (Instant-NGP) with threestudio's progressive band mask.

The torch path is the reference and runs anywhere; ``backend="tcnn"`` uses tinycudann's fused CUDA
encoding with the same hyper-parameters (not bit-identical: tcnn lays out its levels slightly
differently). Coarse levels whose grid fits in the table are indexed densely, finer ones are hashed
with the Instant-NGP primes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recipes.geometry.backend import Backend, import_backend, log_backend_once

HASH_PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    """Hash-grid settings (threestudio defaults: 16 levels × 2 features, 2^19 entries, 16 → 4096).

    The progressive band mask enables ``start_level`` levels until ``start_step``, then one more level
    every ``update_steps`` steps; ``start_level=None`` enables every level from the start.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378
    start_level: int | None = None
    start_step: int = 0
    update_steps: int = 500
    backend: Backend = "torch"

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def enabled_levels(self, step: int) -> int:
        """How many levels (coarsest first) the band mask lets through at ``step``."""
        if self.start_level is None:
            return self.n_levels
        extra = max(step - self.start_step, 0) // self.update_steps
        return min(self.start_level + extra, self.n_levels)


class HashGridEncoding(nn.Module):
    """Encode points in ``[0, 1]^3`` as ``[N, n_levels · n_features_per_level]`` features."""

    def __init__(self, config: HashGridConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else HashGridConfig()
        self.table_size = 2**config.log2_hashmap_size
        self.resolutions = [
            math.floor(config.base_resolution * config.per_level_scale**level)
            for level in range(config.n_levels)
        ]
        self.n_output_dims = config.n_output_dims
        mask = torch.ones(config.n_output_dims)
        self.register_buffer("band_mask", mask)
        self.update_step(0)
        tcnn = import_backend(config.backend, "hash grid")
        log_backend_once("hash grid", config.backend)
        if tcnn is None:
            self.tables = nn.Parameter(
                torch.empty(config.n_levels, self.table_size, config.n_features_per_level).uniform_(
                    -1e-4, 1e-4
                )
            )
            corners = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)])
            self.register_buffer("corners", corners, persistent=False)
            self.register_buffer("primes", torch.tensor(HASH_PRIMES), persistent=False)
            self.tcnn_encoding = None
        else:
            self.tcnn_encoding = tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": config.n_levels,
                    "n_features_per_level": config.n_features_per_level,
                    "log2_hashmap_size": config.log2_hashmap_size,
                    "base_resolution": config.base_resolution,
                    "per_level_scale": config.per_level_scale,
                },
            )

    def update_step(self, step: int) -> None:
        """Set the progressive band mask for ``step`` (a pure function of the step)."""
        enabled = self.config.enabled_levels(step) * self.config.n_features_per_level
        self.band_mask.zero_()
        self.band_mask[:enabled] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.tcnn_encoding is not None:
            features = self.tcnn_encoding(x.reshape(-1, 3)).to(x.dtype)
        else:
            features = torch.cat(
                [self._level(x.reshape(-1, 3), level) for level in range(self.config.n_levels)], dim=-1
            )
        return (features * self.band_mask).reshape(*x.shape[:-1], self.n_output_dims)

    def _level(self, x: Tensor, level: int) -> Tensor:
        resolution = self.resolutions[level]
        scaled = x.clamp(0.0, 1.0) * resolution
        base = scaled.floor().long().clamp(max=resolution - 1)
        frac = scaled - base
        corner = base[:, None, :] + self.corners  # [N, 8, 3], coordinates in [0, resolution]
        if (resolution + 1) ** 3 <= self.table_size:
            index = (corner[..., 0] * (resolution + 1) + corner[..., 1]) * (resolution + 1) + corner[..., 2]
        else:
            hashed = corner * self.primes
            index = (hashed[..., 0] ^ hashed[..., 1] ^ hashed[..., 2]) & (self.table_size - 1)
        corner_features = nn.functional.embedding(index, self.tables[level])  # [N, 8, F]
        weights = torch.where(self.corners.bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
        return (weights[..., None] * corner_features).sum(1)
