"""Full-reference image metrics in pure torch: PSNR and SSIM (Wang et al. 2004, Gaussian window)."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image: ``[B]`` for ``[B, C, H, W]`` inputs, ``inf`` where they are identical."""
    _check_pair(prediction, target)
    mse = (prediction.double() - target.double()).square().flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(torch.float32)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 2-D Gaussian window ``[size, size]`` in float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    profile = torch.exp(-coords.square() / (2.0 * sigma**2))
    profile = profile / profile.sum()
    return profile[:, None] * profile[None, :]


def ssim(
    prediction: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity per image, ``[B]`` for inputs ``[B, C, H, W]``; 1 means identical.

    Local statistics use a Gaussian window (11 × 11, σ = 1.5, per channel) over the positions where it
    fits entirely inside the image ("valid" convolution, as in the reference implementation); the map
    is averaged over positions and channels. Images smaller than the window use a window of their size.
    """
    _check_pair(prediction, target)
    channels = prediction.shape[1]
    size = min(window_size, prediction.shape[-2], prediction.shape[-1])
    window = gaussian_window(size, sigma).to(prediction.device)[None, None].expand(channels, 1, -1, -1)

    def local_mean(image: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(image, window, groups=channels)

    x, y = prediction.double(), target.double()
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).to(torch.float32)


def _check_pair(prediction: Tensor, target: Tensor) -> None:
    if prediction.shape != target.shape or prediction.dim() != 4:
        shapes = f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        raise ValueError(f"expected two [B, C, H, W] images of one shape, got {shapes}")
