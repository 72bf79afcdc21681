"""ScaleDreamer's 3DConv-net: one text-conditioned generator of signed-distance fields for a whole prompt corpus.

A StyleGAN2-style generator in 3-D (after CC3D, as ScaleDreamer's ``3DConv-net`` builds it):

- **Mapping.** The noise ``z`` (``noise_dim``, normalised to unit second moment) passes ``mapping_layers``
  fully connected layers (leaky ReLU 0.2 · √2) to ``style_dim``; the result is concatenated with the pooled text
  embedding and mapped linearly to the style ``w``. One ``w`` drives every layer (no truncation, no mixing).
- **Synthesis.** A learned constant ``channels[0] × 4³`` grows to ``resolution³`` by blocks that double the
  resolution. Each block: a modulated 3×3×3 convolution at the lower resolution and a trilinear ×2 upsample
  (``align_corners=True``), a learned constant bias volume (blocks up to ``bias_resolution``), a second
  modulated 3×3×3 convolution, and a modulated 1×1×1 "to features" layer without demodulation whose output is
  added to the upsampled features of the block before (StyleGAN2's skip generator). Every 3×3×3 convolution adds
  per-voxel noise of learned strength (initialised to 0), a bias, leaky ReLU 0.2 · √2 and a clamp to ±256.
- **Modulation/demodulation.** The style scales the input channels of the weight, and each output channel is
  rescaled to unit norm over (input channel, kernel): ``w'' = w' / √(Σ w'² + 1e-8)`` with ``w' = w · s``, so an
  input of independent unit-variance values gives an output of unit variance whatever the style.
- **Decoding** (:class:`VoxelSDF`). Points of ``[-radius, radius]³`` are mapped to ``[-1, 1]³`` and the feature
  grid is sampled trilinearly (``grid_sample``, ``align_corners=False``, zero padding; ``x, y, z`` index the
  grid's last, middle and first spatial axis). A bias-free ReLU MLP (``threestudio``'s ``VanillaMLP``) gives
  the SDF, to which the sphere bias ``‖x‖ − sphere_radius`` is added (ScaleDreamer's ``sdf_bias: sphere``, 0.8,
  which its configs say converges where 0.5 may not); a second MLP gives the features the material turns into
  colour (sigmoid in ``NoMaterial``). Outside the box the sampled features are 0, the bias-free heads output 0
  and the field is the sphere.

:meth:`Conv3DGenerator.condition` computes the grid of one (embedding, noise) once and returns a field that the
NeuS renderer and the mesh export use like :class:`~recipes.geometry.sdf.ImplicitSDF`; every point query of
that field reuses the grid, and gradients flow from the queries through the grid into the generator.

Randomness: the generator draws nothing from the global RNG. ``z`` is an argument (``None`` is ``z = 0``);
the per-voxel noise is ``"const"`` by default (fixed tensors drawn at construction from ``noise_seed`` with a
private CPU generator, not saved in the state dict since the seed rebuilds them), ``"none"``, or ``"random"``
(ScaleDreamer's training mode), which needs an explicit ``torch.Generator`` in :meth:`~Conv3DGenerator.condition`
so that a Picard slot re-evaluated later sees the same noise.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.geometry.mlp import MLP, MLPConfig
from recipes.geometry.nerf import FieldOutput
from recipes.geometry.sdf import sdf_field_output

VoxelNoiseMode = Literal["const", "random", "none"]

_LRELU_GAIN = math.sqrt(2.0)
_CLAMP = 256.0


@dataclass
class Conv3DGeneratorConfig:
    """3DConv-net settings. Defaults are ScaleDreamer's full size (``asd_sd_3dconv_net_{50k,100k}.yaml``:
    128³ × 32 channels, about 88.7 M parameters), a GPU configuration; see :meth:`tiny` for CPU tests.

    Attributes:
        embedding_dim: size of the pooled text embedding. Default is 1024 (SD 2.1's pooled CLIP output).
        noise_dim: size of the noise ``z``. Default is 64.
        style_dim: size of the style ``w`` and of the mapping layers. Default is 256.
        mapping_layers: fully connected layers applied to ``z`` before the embedding joins. Default is 2.
        resolution: side of the output feature grid, a power of two ≥ 4. Default is 128.
        channels: channels of the blocks at resolutions 4, 8, …, ``resolution`` (one entry per block). Default is
            ``(512, 512, 512, 256, 128, 64)`` (ScaleDreamer's ``channel_multiplier: 1``; its 300k config doubles
            the last three).
        feature_channels: channels of the output grid. Default is 32.
        bias_resolution: blocks up to this resolution add a learned constant bias volume. Default is 64.
        voxel_noise: the per-voxel noise: ``"const"`` (fixed, from ``noise_seed``), ``"random"`` (drawn from the
            generator passed to ``condition``) or ``"none"``. Default is ``"const"``.
        noise_seed: seed of the ``"const"`` noise tensors. Default is 0.
        radius: half-side of the scene box the grid spans. Default is 2.0 (ScaleDreamer: "not good to converge
            in 1.0").
        sphere_radius: radius of the sphere SDF bias ``‖x‖ − r``; ``None`` adds no bias. Default is 0.8.
        n_feature_dims: outputs of the colour head (the material's input). Default is 3.
        mlp: hidden layers of both heads. Default is one hidden layer of 64 (``VanillaMLP`` 32→64→1 and 32→64→3).
        normal_type: ``"finite_difference"`` (central differences, 6 extra SDF queries a point) or
            ``"analytic"`` (autograd). Default is ``"finite_difference"``.
        finite_difference_normal_eps: the central-difference step in world units. Default is 0.01 (ScaleDreamer).
    """

    embedding_dim: int = 1024
    noise_dim: int = 64
    style_dim: int = 256
    mapping_layers: int = 2
    resolution: int = 128
    channels: tuple[int, ...] = (512, 512, 512, 256, 128, 64)
    feature_channels: int = 32
    bias_resolution: int = 64
    voxel_noise: VoxelNoiseMode = "const"
    noise_seed: int = 0
    radius: float = 2.0
    sphere_radius: float | None = 0.8
    n_feature_dims: int = 3
    mlp: MLPConfig = field(default_factory=MLPConfig)
    normal_type: Literal["analytic", "finite_difference"] = "finite_difference"
    finite_difference_normal_eps: float = 0.01

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        levels = math.log2(self.resolution) if self.resolution > 0 else -1.0
        if self.resolution < 4 or levels != int(levels):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        blocks = int(levels) - 1
        if len(self.channels) != blocks:
            raise ValueError(
                f"channels needs one entry per block resolution 4..{self.resolution} ({blocks} entries), "
                f"got {len(self.channels)}: {self.channels}"
            )
        if self.voxel_noise not in ("const", "random", "none"):
            raise ValueError(f"unknown voxel_noise {self.voxel_noise!r}; use 'const', 'random' or 'none'")
        if self.normal_type not in ("analytic", "finite_difference"):
            raise ValueError(
                f"unknown normal_type {self.normal_type!r}; use 'finite_difference' or 'analytic'"
            )

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        """4, 8, …, ``resolution``."""
        return tuple(2**i for i in range(2, int(math.log2(self.resolution)) + 1))

    @classmethod
    def tiny(cls, **overrides: object) -> Conv3DGeneratorConfig:
        """A CPU-sized generator (16³ × 8 channels, embedding 32, noise 8, style 32); ``overrides`` replace fields."""
        values: dict[str, object] = dict(
            embedding_dim=32,
            noise_dim=8,
            style_dim=32,
            resolution=16,
            channels=(16, 16, 8),
            feature_channels=8,
            bias_resolution=16,
            mlp=MLPConfig(n_neurons=16),
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def normalize_second_moment(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / √(mean(x²) + eps)`` along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv3d(
    x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, padding: int = 0
) -> Tensor:
    """3-D convolution of ``x [B, I, D, H, W]`` by ``weight [O, I, k, k, k]`` scaled per sample by ``styles [B, I]``.

    With ``demodulate`` each sample's output channel is divided by the norm of its modulated weights, so unit-variance
    independent inputs give unit-variance outputs. The batch runs as one grouped convolution.
    """
    batch, in_channels = styles.shape
    if x.shape[:2] != (batch, in_channels) or weight.shape[1] != in_channels:
        raise ValueError(
            f"modulated_conv3d: input {tuple(x.shape)}, weight {tuple(weight.shape)} and styles "
            f"{tuple(styles.shape)} disagree on batch or input channels"
        )
    w = weight[None] * styles[:, None, :, None, None, None]  # [B, O, I, k, k, k]
    if demodulate:
        w = w * (w.square().sum(dim=(2, 3, 4, 5), keepdim=True) + 1e-8).rsqrt()
    out = F.conv3d(
        x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *weight.shape[1:]), padding=padding, groups=batch
    )
    return out.reshape(batch, -1, *out.shape[2:])


class EqualizedLinear(nn.Module):
    """StyleGAN's fully connected layer: weights ``N(0, 1)`` scaled by ``1/√in`` at run time, optional lrelu·√2."""

    def __init__(self, n_in: int, n_out: int, activation: bool = False, bias_init: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.full((n_out,), float(bias_init)))
        self.gain = 1.0 / math.sqrt(n_in)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = torch.addmm(self.bias[None], x, (self.weight * self.gain).t())
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation else x


class MappingNetwork(nn.Module):
    """(noise ``[B, noise_dim]``, embedding ``[B, embedding_dim]``) → style ``[B, style_dim]``."""

    def __init__(self, config: Conv3DGeneratorConfig) -> None:
        super().__init__()
        widths = [config.noise_dim] + [config.style_dim] * config.mapping_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(a, b, activation=True) for a, b in itertools.pairwise(widths)
        )
        self.embed = EqualizedLinear(widths[-1] + config.embedding_dim, config.style_dim)

    def forward(self, noise: Tensor, embedding: Tensor) -> Tensor:
        x = normalize_second_moment(noise)
        for layer in self.layers:
            x = layer(x)
        return self.embed(torch.cat([x, embedding], dim=-1))


class ModulatedConv(nn.Module):
    """Modulated 3×3×3 convolution, optional ×2 trilinear upsample, per-voxel noise, bias, lrelu·√2, clamp."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        style_dim: int,
        resolution: int,
        upsample: bool,
        voxel_noise: VoxelNoiseMode,
        noise_generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.affine = EqualizedLinear(style_dim, n_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(n_out, n_in, 3, 3, 3))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.resolution, self.upsample, self.voxel_noise = resolution, upsample, voxel_noise
        if voxel_noise != "none":
            self.noise_strength = nn.Parameter(torch.zeros(()))
        if voxel_noise == "const":
            const = torch.randn((resolution,) * 3, generator=noise_generator)
            self.register_buffer("noise_const", const, persistent=False)

    def forward(self, x: Tensor, style: Tensor, generator: torch.Generator | None) -> Tensor:
        x = modulated_conv3d(x, self.weight, self.affine(style), demodulate=True, padding=1)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        if self.voxel_noise == "const":
            x = x + self.noise_const * self.noise_strength
        elif self.voxel_noise == "random":
            if generator is None:
                raise ValueError(
                    "voxel_noise='random' draws the per-voxel noise from an explicit generator: pass "
                    "generator=torch.Generator(...) to condition()/synthesize(), or use voxel_noise='const'"
                )
            shape = (x.shape[0], 1, *(self.resolution,) * 3)
            noise = torch.randn(shape, generator=generator, device=generator.device).to(x)
            x = x + noise * self.noise_strength
        x = F.leaky_relu(x + self.bias[None, :, None, None, None], 0.2)
        return (x * _LRELU_GAIN).clamp(-_CLAMP, _CLAMP)


class ToFeatures(nn.Module):
    """Modulated 1×1×1 convolution to the output channels, without demodulation (StyleGAN's ``toRGB``)."""

    def __init__(self, n_in: int, n_out: int, style_dim: int) -> None:
        super().__init__()
        self.affine = EqualizedLinear(style_dim, n_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(n_out, n_in, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.gain = 1.0 / math.sqrt(n_in)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        styles = self.affine(style) * self.gain
        return (
            modulated_conv3d(x, self.weight, styles, demodulate=False) + self.bias[None, :, None, None, None]
        )


class SynthesisBlock(nn.Module):
    """One resolution doubling: conv0 (+ upsample), bias volume, conv1, to-features, skip-add."""

    def __init__(
        self, n_in: int, n_out: int, resolution: int, config: Conv3DGeneratorConfig, noise: torch.Generator
    ) -> None:
        super().__init__()
        mode, style = config.voxel_noise, config.style_dim
        self.conv0 = ModulatedConv(n_in, n_out, style, resolution, True, mode, noise)
        self.conv1 = ModulatedConv(n_out, n_out, style, resolution, False, mode, noise)
        self.to_features = ToFeatures(n_out, config.feature_channels, style)
        self.bias_volume = (
            nn.Parameter(torch.randn(n_out, resolution, resolution, resolution) / math.sqrt(n_out))
            if resolution <= config.bias_resolution
            else None
        )

    def forward(
        self, x: Tensor, out: Tensor, style: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        x = self.conv0(x, style, generator)
        if self.bias_volume is not None:
            x = x + self.bias_volume
        x = self.conv1(x, style, generator)
        out = F.interpolate(out, scale_factor=2, mode="trilinear", align_corners=True)
        return x, out + self.to_features(x, style)


class Conv3DGenerator(nn.Module):
    """(pooled text embedding, noise) → feature voxel grid → signed-distance field (:class:`VoxelSDF`).

    Parameters: the mapping network, the constant, the modulated convolutions (weights, affines, biases, noise
    strengths, bias volumes) and the two decoding heads ``sdf_network`` and ``feature_network``.
    """

    def __init__(self, config: Conv3DGeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else Conv3DGeneratorConfig()
        self.embedding_dim = config.embedding_dim
        self.noise_dim = config.noise_dim
        noise = torch.Generator(device="cpu").manual_seed(config.noise_seed)
        channels, resolutions = config.channels, config.block_resolutions
        self.mapping = MappingNetwork(config)
        self.const = nn.Parameter(torch.randn(channels[0], 4, 4, 4))
        self.conv = ModulatedConv(
            channels[0], channels[0], config.style_dim, 4, False, config.voxel_noise, noise
        )
        self.to_features = ToFeatures(channels[0], config.feature_channels, config.style_dim)
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[i - 1], channels[i], resolutions[i], config, noise)
            for i in range(1, len(resolutions))
        )
        self.sdf_network = MLP(config.feature_channels, 1, config.mlp)
        self.feature_network = MLP(config.feature_channels, config.n_feature_dims, config.mlp)

    @property
    def radius(self) -> float:
        return self.config.radius

    def update_step(self, step: int) -> None:
        """No step schedules (present so the renderer's ``update_step`` can call it)."""

    def style(self, embedding: Tensor, noise: Tensor | None = None) -> Tensor:
        """The style ``w [B, style_dim]`` of embeddings ``[B, embedding_dim]`` and noise ``[B, noise_dim]``
        (``None``: zeros)."""
        if embedding.dim() != 2 or embedding.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected text embeddings [B, {self.embedding_dim}], got {tuple(embedding.shape)}; "
                "set embedding_dim to the text encoder's pooled size"
            )
        if noise is None:
            noise = embedding.new_zeros(embedding.shape[0], self.noise_dim)
        if noise.shape != (embedding.shape[0], self.noise_dim):
            raise ValueError(
                f"expected noise [{embedding.shape[0]}, {self.noise_dim}], got {tuple(noise.shape)}"
            )
        return self.mapping(noise.to(embedding), embedding)

    def synthesize(
        self, embedding: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The feature grid ``[B, feature_channels, R, R, R]`` of embeddings ``[B, D]`` and noise ``[B, noise_dim]``.

        ``generator`` feeds ``voxel_noise="random"`` and is not used otherwise.
        """
        style = self.style(embedding, noise)
        x = self.conv(self.const[None].expand(style.shape[0], -1, -1, -1, -1), style, generator)
        out = self.to_features(x, style)
        for block in self.blocks:
            x, out = block(x, out, style, generator)
        return out

    def condition(
        self, embedding: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> VoxelSDF:
        """The field of one prompt: embedding ``[D]`` and noise ``[noise_dim]`` (``None``: zeros).

        The grid is synthesised here, once; the returned field only samples it.
        """
        if embedding.dim() != 1:
            raise ValueError(
                f"condition() takes one embedding [{self.embedding_dim}], got {tuple(embedding.shape)}; "
                "call it once per prompt (or use synthesize() for a batch of grids)"
            )
        grid = self.synthesize(embedding[None], None if noise is None else noise[None], generator)
        return VoxelSDF(self, grid[0])


class VoxelSDF(nn.Module):
    """A signed-distance field sampled from one generated feature grid ``[C, R, R, R]``.

    It holds no parameters or state of its own: the grid (still attached to the generator's graph) and a reference
    to the generator's decoding heads, which stay registered on the generator only. Drop-in for
    :class:`~recipes.geometry.sdf.ImplicitSDF` in :class:`~recipes.render.neus.NeuSRenderer` and the mesh export.
    """

    def __init__(self, generator: Conv3DGenerator, grid: Tensor) -> None:
        super().__init__()
        if grid.dim() != 4:
            raise ValueError(f"expected one feature grid [C, R, R, R], got {tuple(grid.shape)}")
        self.__dict__["_generator"] = generator  # not a submodule: its parameters stay the generator's
        self.grid = grid

    @property
    def generator(self) -> Conv3DGenerator:
        return self.__dict__["_generator"]

    @property
    def config(self) -> Conv3DGeneratorConfig:
        return self.generator.config

    @property
    def radius(self) -> float:
        return self.config.radius

    def update_step(self, step: int) -> None:
        """No step schedules."""

    def finite_difference_eps(self) -> float:
        """The central-difference step in world units."""
        return float(self.config.finite_difference_normal_eps)

    def sdf_bias(self, points: Tensor) -> Tensor:
        """``‖x‖ − sphere_radius`` (zeros when ``sphere_radius`` is None)."""
        if self.config.sphere_radius is None:
            return torch.zeros_like(points[..., 0])
        return points.norm(dim=-1) - self.config.sphere_radius

    def features_at(self, points: Tensor) -> Tensor:
        """Trilinearly sampled grid features ``[..., C]`` at points ``[..., 3]`` (zero outside the box)."""
        coords = (points / self.radius).reshape(1, 1, 1, -1, 3).to(self.grid.dtype)
        sampled = F.grid_sample(
            self.grid[None], coords, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return sampled.reshape(self.grid.shape[0], -1).t().reshape(*points.shape[:-1], self.grid.shape[0])

    def _sdf_and_features(self, points: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features_at(points)
        return self.generator.sdf_network(features)[..., 0] + self.sdf_bias(points), features

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance ``[...]`` at points ``[..., 3]``."""
        return self._sdf_and_features(points)[0]

    def forward(self, points: Tensor, with_normal: bool = True) -> FieldOutput:
        """SDF, its gradient, unit normals and features at points ``[N, 3]`` (the gradient is always computed)."""
        return sdf_field_output(
            points,
            self._sdf_and_features,
            self.generator.feature_network,
            self.config.normal_type,
            self.finite_difference_eps(),
        )


__all__ = [
    "Conv3DGenerator",
    "Conv3DGeneratorConfig",
    "MappingNetwork",
    "VoxelSDF",
    "modulated_conv3d",
    "normalize_second_moment",
]
