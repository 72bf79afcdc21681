"""A weight-free diffusion prior: the exact denoiser of a finite set of posed reference images.

If the data distribution is the uniform mixture of N reference images y_i, the forward process
x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε makes p(x_t) a mixture of Gaussians, and the minimum-MSE denoiser has a
closed form:

    x̂₀(x_t) = Σ_i w_i y_i,   w = softmax_i(−‖x_t − √ᾱ_t y_i‖² / (2(1 − ᾱ_t)) + v_i),

with v_i = 0 for the plain (unconditional) mixture. This is what a perfectly trained diffusion model on
those N images would predict. Camera conditioning multiplies the mixture weights by a kernel on the
angle between the query camera and reference i, v_i = −angle² / (2σ²), and can additionally drop every
reference further than θ° (always keeping the nearest one). ``predict_noise`` returns the matching
ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t), so SDS, VSD and ASD run on it as on any other ``Denoiser``.

See docs/recipes/closed-form-prior.md for the derivation and the limits of this prior.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recipes.data.cameras import Cameras, spherical_to_cartesian


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """ᾱ_t of Stable Diffusion's "scaled_linear" schedule (√β linear in t), float32 ``[T]``."""
    betas = torch.linspace(
        math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64
    )
    return torch.cumprod(1.0 - betas**2, dim=0).to(torch.float32)


def view_directions(condition: Any) -> Tensor | None:
    """Unit vectors ``[B, 3]`` from the object towards each query camera, or ``None`` for no condition.

    Accepted conditions: ``None``; a ``Cameras`` batch (or anything with a ``c2w`` attribute);
    camera-to-world matrices ``[B, 4, 4]``; or ``[B, 2]`` (elevation, azimuth) in degrees. A camera's
    direction is the +z axis of its OpenGL frame (it looks along −z), which for an orbit camera
    looking at the origin is its position on the unit sphere (z-up, see ``recipes.data.cameras``).
    """
    if condition is None:
        return None
    if isinstance(condition, Cameras) or hasattr(condition, "c2w"):
        condition = condition.c2w
    if not isinstance(condition, Tensor):
        raise TypeError(
            f"unsupported view condition {type(condition).__name__}: expected None, Cameras, "
            "c2w [B, 4, 4] or (elevation, azimuth) degrees [B, 2]"
        )
    condition = condition.to(torch.float32)
    if condition.dim() == 3 and condition.shape[-2:] == (4, 4):
        return nn.functional.normalize(condition[:, :3, 2], dim=-1)
    if condition.dim() == 2 and condition.shape[-1] == 2:
        return spherical_to_cartesian(condition[:, 0], condition[:, 1], torch.ones_like(condition[:, 0]))
    raise ValueError(f"view condition of shape {tuple(condition.shape)}: expected [B, 4, 4] or [B, 2]")


def angles_between_deg(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise angles in degrees ``[A, B]`` between unit vectors ``a [A, 3]`` and ``b [B, 3]``."""
    return torch.rad2deg(torch.acos((a @ b.T).clamp(-1.0, 1.0)))


class ClosedFormPrior(nn.Module):
    """Exact posterior-mean denoiser of a set of posed reference images, on the SD scaled-linear schedule.

    Args:
        references: reference images ``[N, C, H, W]`` in [−1, 1].
        reference_directions: unit vectors ``[N, 3]`` from the object towards each reference camera
            (``view_directions(cameras)``).
        sigma_deg: width of the Gaussian camera kernel on the mixture logits (``None``: no kernel).
        restrict_deg: if set, a conditioned query only sees references within this angle (plus the
            nearest one, so the set is never empty). With neither kernel nor restriction the prior
            ignores its condition.
        num_train_timesteps: length of the schedule (1000, as SD).

    Conditions are read by ``view_directions``; ``None`` means unconditional (every reference, no view
    term). The references are non-persistent buffers: ``.to(device)`` moves them, checkpoints skip them.
    """

    alphas_cumprod: Tensor
    references: Tensor
    reference_directions: Tensor

    def __init__(
        self,
        references: Tensor,
        reference_directions: Tensor,
        sigma_deg: float | None = 10.0,
        restrict_deg: float | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if references.dim() != 4:
            raise ValueError(f"references must be [N, C, H, W], got {tuple(references.shape)}")
        if reference_directions.shape != (references.shape[0], 3):
            expected, got = (references.shape[0], 3), tuple(reference_directions.shape)
            raise ValueError(f"reference_directions must be {expected}, got {got}")
        self.sigma_deg = sigma_deg
        self.restrict_deg = restrict_deg
        self.num_train_timesteps = num_train_timesteps
        refs = references.detach().to(torch.float32)
        self.register_buffer("references", refs, persistent=False)
        self.register_buffer("reference_sq_norms", refs.flatten(1).square().sum(dim=1), persistent=False)
        self.register_buffer(
            "reference_directions",
            nn.functional.normalize(reference_directions.detach().to(torch.float32), dim=-1),
            persistent=False,
        )
        self.register_buffer(
            "alphas_cumprod", scaled_linear_alphas_cumprod(num_train_timesteps), persistent=False
        )

    @classmethod
    def from_cameras(cls, references: Tensor, cameras: Cameras, **kwargs: Any) -> ClosedFormPrior:
        """The prior of ``references [N, C, H, W]`` (in [−1, 1]) seen from ``cameras`` (N views)."""
        return cls(references, view_directions(cameras), **kwargs)

    @classmethod
    def from_procedural_object(
        cls,
        height: int = 32,
        width: int | None = None,
        sigma_deg: float | None = 10.0,
        restrict_deg: float | None = None,
        **reference_view_kwargs: Any,
    ) -> ClosedFormPrior:
        """The prior of the default procedural object's reference views (12 azimuths × 3 elevations).

        ``reference_view_kwargs`` go to ``recipes.data.procedural.reference_cameras`` (azimuth count,
        elevations, distance, field of view).
        """
        from recipes.data.procedural import default_procedural_object, reference_cameras

        cameras = reference_cameras(height=height, width=width or height, **reference_view_kwargs)
        images = default_procedural_object().render(cameras).rgb * 2.0 - 1.0
        return cls.from_cameras(images, cameras, sigma_deg=sigma_deg, restrict_deg=restrict_deg)

    @property
    def num_references(self) -> int:
        return self.references.shape[0]

    def view_logits(self, condition: Any, batch_size: int) -> Tensor | None:
        """Camera term of the mixture logits, ``[B, N]`` (−inf for excluded references), or ``None``."""
        directions = view_directions(condition)
        if directions is None or (self.sigma_deg is None and self.restrict_deg is None):
            return None
        directions = directions.to(self.reference_directions.device)
        if directions.shape[0] not in (1, batch_size):
            raise ValueError(f"condition has {directions.shape[0]} cameras for a batch of {batch_size}")
        angles = angles_between_deg(directions, self.reference_directions).expand(batch_size, -1)
        logits = torch.zeros_like(angles)
        if self.sigma_deg is not None:
            logits = logits - angles.square() / (2.0 * self.sigma_deg**2)
        if self.restrict_deg is not None:
            nearest = angles.argmin(dim=1, keepdim=True)
            keep = (angles <= self.restrict_deg).scatter(1, nearest, True)
            logits = logits.masked_fill(~keep, -math.inf)
        return logits

    def mixture_weights(self, x_t: Tensor, t: Tensor, condition: Any = None) -> Tensor:
        """Posterior responsibilities p(y_i | x_t, condition), ``[B, N]``, rows summing to 1."""
        return self._weights(self._data_logits(x_t, t), condition)

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Any = None) -> Tensor:
        """Posterior mean x̂₀ = E[y | x_t, condition], same shape and dtype as ``x_t``."""
        return self._mixture_mean(self.mixture_weights(x_t, t, condition), x_t.shape).to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Any = None) -> Tensor:
        """ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t) for integer timesteps ``t [B]`` (``Denoiser`` protocol)."""
        return self._noise_from_weights(x_t, t, self.mixture_weights(x_t, t, condition))

    def predict_noise_pair(
        self, x_t: Tensor, t: Tensor, condition: Any, uncondition: Any = None
    ) -> tuple[Tensor, Tensor]:
        """(ε̂ under ``condition``, ε̂ under ``uncondition``) sharing one data-term evaluation (for CFG)."""
        data_logits = self._data_logits(x_t, t)
        return (
            self._noise_from_weights(x_t, t, self._weights(data_logits, condition)),
            self._noise_from_weights(x_t, t, self._weights(data_logits, uncondition)),
        )

    def _alpha_bar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t.to(self.alphas_cumprod.device).long()]

    def _data_logits(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.shape[1:] != self.references.shape[1:]:
            raise ValueError(f"x_t is {tuple(x_t.shape)}, the references are {tuple(self.references.shape)}")
        alpha_bar = self._alpha_bar(t).reshape(x_t.shape[0], 1)
        x = x_t.to(torch.float32).flatten(1)
        # −‖x − √ᾱ y‖² / 2(1−ᾱ) without the ‖x‖² term, which is the same for every reference.
        dot = x @ self.references.flatten(1).T
        return (alpha_bar.sqrt() * dot - 0.5 * alpha_bar * self.reference_sq_norms) / (1.0 - alpha_bar)

    def _weights(self, data_logits: Tensor, condition: Any) -> Tensor:
        view = self.view_logits(condition, data_logits.shape[0])
        return torch.softmax(data_logits if view is None else data_logits + view, dim=1)

    def _mixture_mean(self, weights: Tensor, shape: torch.Size) -> Tensor:
        return (weights @ self.references.flatten(1)).reshape(shape)

    def _noise_from_weights(self, x_t: Tensor, t: Tensor, weights: Tensor) -> Tensor:
        x0 = self._mixture_mean(weights, x_t.shape)
        alpha_bar = self._alpha_bar(t).reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.to(torch.float32) - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()
        return eps.to(x_t.dtype)
