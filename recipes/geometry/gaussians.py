"""3D Gaussians as in DreamGaussian: ball initialisation, SH degree 0, and its Adam learning rates.

The scene is five parameter tensors over N Gaussians (``means``, ``sh_dc``, ``opacity_logits``,
``log_scales``, ``quats``); activations turn them into what a splatter consumes. Everything that
changes N (densify, prune) lives in :mod:`recipes.geometry.gaussian_density_control` and works on the
plain ``dict`` of these tensors, so the Picard replay can run it as a pure function. A new N is loaded
*in place* (:meth:`Gaussians.load_tensors` reassigns ``param.data``): the ``nn.Parameter`` objects never
change, as ``lightning_picard``'s ``picard_after_optimizer_step`` protocol requires, and a state dict with
another number of Gaussians loads into an existing module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic: colour = SH_C0 · dc + 0.5."""

PARAMETER_NAMES = ("means", "sh_dc", "opacity_logits", "log_scales", "quats")


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """The degree-0 SH coefficient that renders as ``rgb``."""
    return (rgb - 0.5) / SH_C0


def inverse_sigmoid(x: Tensor) -> Tensor:
    """Logit of ``x`` (``x`` strictly inside (0, 1))."""
    return torch.log(x / (1 - x))


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """Rotation matrices ``[N, 3, 3]`` of (not necessarily normalised) quaternions ``[N, 4]`` in wxyz order."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances ``R S Sᵀ Rᵀ``, ``[N, 3, 3]``."""
    rs = quaternion_to_rotation(quats) * scales[..., None, :]
    return rs @ rs.transpose(-1, -2)


def mean_sq_distance_to_neighbours(points: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Mean squared distance of every point to its ``k`` nearest other points, ``[N]`` (brute force)."""
    out = []
    for start in range(0, points.shape[0], chunk):
        d2 = torch.cdist(points[start : start + chunk], points).square()
        nearest = d2.topk(min(k + 1, points.shape[0]), dim=1, largest=False).values[:, 1:]
        out.append(nearest.mean(dim=1))
    return torch.cat(out)


def resize_rows_to_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook: give ``module``'s own parameters and buffers the row count of the incoming ones.

    Only tensors whose number of rows (dim 0) differs and whose other dimensions agree are resized, in place
    (``param.data = …``, the ``nn.Parameter`` objects are kept; a resized parameter's ``.grad`` is cleared);
    ``load_state_dict`` then copies the values. Any other mismatch is left for ``load_state_dict`` to report.
    Register with ``module.register_load_state_dict_pre_hook(resize_rows_to_state_dict)``.
    """
    for name, param in module.named_parameters(recurse=False):
        incoming = state_dict.get(prefix + name)
        if _other_rows(incoming, param):
            param.data = param.data.new_empty(incoming.shape)
            param.grad = None
    for name, buffer in module.named_buffers(recurse=False):
        incoming = state_dict.get(prefix + name)
        if _other_rows(incoming, buffer):
            setattr(module, name, buffer.new_empty(incoming.shape))


def _other_rows(incoming: object, current: Tensor) -> bool:
    return (
        isinstance(incoming, Tensor)
        and incoming.dim() == current.dim() > 0
        and incoming.shape[1:] == current.shape[1:]
        and incoming.shape[0] != current.shape[0]
    )


def sample_ball(num_points: int, radius: float, generator: torch.Generator) -> Tensor:
    """``num_points`` points uniformly distributed in a ball of ``radius`` around the origin."""
    u = torch.rand(num_points, 3, generator=generator, dtype=torch.float64)
    phi = 2 * math.pi * u[:, 0]
    cos_theta = 2 * u[:, 1] - 1
    sin_theta = torch.sqrt(1 - cos_theta**2)
    r = radius * torch.pow(u[:, 2], 1 / 3)
    xyz = torch.stack([sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), cos_theta], dim=-1)
    return (r[:, None] * xyz).float()


@dataclass
class GaussianLearningRates:
    """DreamGaussian's Adam learning rates (``configs/text.yaml``; ``position_lr_max_steps`` 500 in image.yaml).

    The position learning rate decays log-linearly from ``position_lr_init · spatial_lr_scale`` to
    ``position_lr_final · spatial_lr_scale`` over ``position_lr_max_steps``. As in DreamGaussian the
    warm-up delay is off (``position_lr_delay_steps = 0``), so ``position_lr_delay_mult`` only matters
    when a delay is set.
    """

    position_lr_init: float = 0.001
    position_lr_final: float = 0.00002
    position_lr_delay_mult: float = 0.02
    position_lr_delay_steps: int = 0
    position_lr_max_steps: int = 300
    spatial_lr_scale: float = 10.0
    feature_lr: float = 0.01
    opacity_lr: float = 0.05
    scaling_lr: float = 0.005
    rotation_lr: float = 0.005
    eps: float = 1e-15

    def position_lr(self, step: int) -> float:
        """Learning rate of the means for the optimizer step numbered ``step`` (DreamGaussian counts from 1)."""
        lr_init = self.position_lr_init * self.spatial_lr_scale
        lr_final = self.position_lr_final * self.spatial_lr_scale
        if step < 0:
            return 0.0
        delay = 1.0
        if self.position_lr_delay_steps > 0:
            ramp = min(max(step / self.position_lr_delay_steps, 0.0), 1.0)
            delay = self.position_lr_delay_mult + (1 - self.position_lr_delay_mult) * math.sin(
                0.5 * math.pi * ramp
            )
        t = min(max(step / self.position_lr_max_steps, 0.0), 1.0)
        return delay * math.exp((1 - t) * math.log(lr_init) + t * math.log(lr_final))

    def base_lrs(self) -> dict[str, float]:
        """Initial learning rate of every parameter tensor, keyed by name."""
        return {
            "means": self.position_lr_init * self.spatial_lr_scale,
            "sh_dc": self.feature_lr,
            "opacity_logits": self.opacity_lr,
            "log_scales": self.scaling_lr,
            "quats": self.rotation_lr,
        }


class PositionLRFactor:
    """``LambdaLR`` factor for the means group: scheduler epoch k is optimizer step k + 1 in DreamGaussian.

    It keeps the learning rates as a plain dict: ``LambdaLR.state_dict()`` saves this object's ``__dict__``, and a
    checkpoint of plain values loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, lrs: GaussianLearningRates) -> None:
        self.lrs_fields = dataclasses.asdict(lrs)

    def __call__(self, scheduler_step: int) -> float:
        lrs = GaussianLearningRates(**self.lrs_fields)
        return lrs.position_lr(scheduler_step + 1) / lrs.base_lrs()["means"]


class Gaussians(nn.Module):
    """N anisotropic 3D Gaussians with degree-0 SH colour (DreamGaussian's ``GaussianModel``).

    Args:
        num_points: initial count (DreamGaussian: 5000).
        radius: initial points are uniform in a ball of this radius (DreamGaussian: 0.5).
        init_opacity: opacity of every initial Gaussian (DreamGaussian: 0.1).
        seed: seeds the initialisation generator (positions and the near-black random colours).
        init_color: RGB value in [0, 1] given to every initial Gaussian (e.g. 0.5 for grey), or ``None``
            for DreamGaussian's near-black random colours (uniform in [0, 1/255]). The positions do not
            depend on it. Default is ``None``.
    """

    def __init__(
        self,
        num_points: int = 5000,
        radius: float = 0.5,
        init_opacity: float = 0.1,
        seed: int = 0,
        init_color: float | None = None,
    ):
        super().__init__()
        if init_color is not None and not 0.0 <= init_color <= 1.0:
            raise ValueError(f"init_color must be an RGB value in [0, 1] or None, got {init_color}")
        generator = torch.Generator().manual_seed(seed)
        means = sample_ball(num_points, radius, generator)
        colors = torch.rand(num_points, 3, generator=generator) / 255.0
        if init_color is not None:
            colors = torch.full_like(colors, init_color)
        scale = torch.sqrt(mean_sq_distance_to_neighbours(means).clamp_min(1e-7))
        self.means = nn.Parameter(means)
        self.sh_dc = nn.Parameter(rgb_to_sh_dc(colors))
        self.opacity_logits = nn.Parameter(inverse_sigmoid(torch.full((num_points,), init_opacity)))
        self.log_scales = nn.Parameter(torch.log(scale)[:, None].repeat(1, 3))
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(num_points, 1))
        self.register_load_state_dict_pre_hook(resize_rows_to_state_dict)

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def rotations(self) -> Tensor:
        """Unit quaternions (wxyz)."""
        return torch.nn.functional.normalize(self.quats, dim=-1)

    @property
    def colors(self) -> Tensor:
        """RGB of every Gaussian, ``[N, 3]`` (view-independent at SH degree 0)."""
        return (SH_C0 * self.sh_dc + 0.5).clamp_min(0.0)

    def parameter_dict(self) -> dict[str, nn.Parameter]:
        """The five parameter tensors keyed by name (the state densify/prune transforms)."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
        """Set every parameter to a copy of ``tensors[name]`` in place; the number of Gaussians may change.

        The ``nn.Parameter`` objects are kept (``param.data`` is reassigned), so an optimizer's param groups
        and Picard keep referring to the live parameters; resize the optimizer's state with
        :func:`~recipes.geometry.gaussian_density_control.remap_optimizer`. Every ``.grad`` is cleared (it
        belongs to the old values). Values are copied (never aliased) in the parameters' dtype and device.
        Returns :meth:`parameter_dict`.
        """
        missing = [name for name in PARAMETER_NAMES if name not in tensors]
        if missing:
            raise KeyError(f"load_tensors needs every tensor of {PARAMETER_NAMES}; missing {missing}.")
        rows = {name: tensors[name].shape[0] for name in PARAMETER_NAMES}
        if len(set(rows.values())) != 1:
            raise ValueError(f"load_tensors got tensors with different numbers of Gaussians: {rows}.")
        for name in PARAMETER_NAMES:
            param = getattr(self, name)
            param.data = tensors[name].detach().to(device=param.device, dtype=param.dtype, copy=True)
            param.grad = None
        return self.parameter_dict()

    def param_groups(self, lrs: GaussianLearningRates) -> list[dict]:
        """One Adam param group per tensor, named like the tensors, with DreamGaussian's learning rates."""
        base = lrs.base_lrs()
        return [{"params": [getattr(self, name)], "lr": base[name], "name": name} for name in PARAMETER_NAMES]

    def configure_optimizer(
        self, lrs: GaussianLearningRates
    ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
        """Adam(eps=1e-15) over :meth:`param_groups` and a per-step scheduler decaying only the means' LR."""
        optimizer = torch.optim.Adam(self.param_groups(lrs), lr=0.0, eps=lrs.eps)
        factors = [
            PositionLRFactor(lrs) if group["name"] == "means" else _one for group in optimizer.param_groups
        ]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _one(_: int) -> float:
    return 1.0
