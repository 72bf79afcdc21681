"""PSNR and SSIM agree with their definitions; novel-view quality ranks renders of the ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.data.procedural import default_procedural_object, held_out_cameras
from recipes.eval import novel_view_quality, psnr, silhouette_iou, ssim
from recipes.eval.metrics import gaussian_window


def random_images(seed: int, shape=(2, 3, 24, 24)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_is_infinite_for_identical_images_and_exact_for_a_known_error():
    image = random_images(0) * 0.8
    assert torch.isinf(psnr(image, image)).all()
    torch.testing.assert_close(psnr(image + 0.1, image), torch.full((2,), 20.0))
    torch.testing.assert_close(psnr(image + 0.2, image, data_range=2.0), torch.full((2,), 20.0))


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    image = random_images(1)
    torch.testing.assert_close(ssim(image, image), torch.ones(2))
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(image.shape, generator=generator)
    scores = [ssim((image + level * noise).clamp(0, 1), image).mean().item() for level in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    torch.testing.assert_close(ssim(image * 0.5, image), ssim(image, image * 0.5))


def test_ssim_of_a_window_sized_image_is_the_weighted_formula():
    """On an 11 × 11 image the Gaussian window fits once, so SSIM is the formula on weighted statistics."""
    x, y = random_images(3, (1, 1, 11, 11)), random_images(4, (1, 1, 11, 11))
    weights = gaussian_window(11, 1.5)
    xd, yd = x[0, 0].double(), y[0, 0].double()
    mu_x, mu_y = (weights * xd).sum(), (weights * yd).sum()
    var_x, var_y = (weights * (xd - mu_x) ** 2).sum(), (weights * (yd - mu_y) ** 2).sum()
    cov = (weights * (xd - mu_x) * (yd - mu_y)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    assert ssim(x, y).item() == pytest.approx(expected.item(), abs=1e-6)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr(random_images(5), random_images(6, (2, 3, 24, 23)))


def test_novel_view_quality_ranks_renders_against_the_ground_truth():
    truth = default_procedural_object()
    cameras = held_out_cameras(height=24, width=24)
    assert len(cameras) == 8

    def perfect(c):
        return truth.render(c).rgb

    def slightly_off(c):
        return (
            truth.render(c).rgb
            + 0.05 * torch.randn(len(c), 3, 24, 24, generator=torch.Generator().manual_seed(7))
        ).clamp(0, 1)

    def empty(c):
        return torch.ones(len(c), 3, c.height, c.width)

    exact = novel_view_quality(perfect, cameras)
    assert math.isinf(exact.psnr) and exact.ssim == pytest.approx(1.0)
    noisy, blank = novel_view_quality(slightly_off, cameras), novel_view_quality(empty, cameras)
    assert exact.psnr > noisy.psnr > blank.psnr and exact.ssim > noisy.ssim > blank.ssim
    assert noisy.psnr_per_view.shape == (8,) and 25 < noisy.psnr < 30  # σ = 0.05 noise is 26 dB
    assert noisy.psnr == pytest.approx(noisy.psnr_per_view.mean().item())


def test_silhouette_iou_is_one_for_the_true_shape_and_falls_with_a_smaller_or_missing_one():
    truth = default_procedural_object()
    cameras = held_out_cameras(height=24, width=24)

    def true_alpha(c):
        return truth.render(c).alpha

    def eroded(c):  # the true silhouette less its boundary pixels
        alpha = truth.render(c).alpha
        return -torch.nn.functional.max_pool2d(-alpha, 3, stride=1, padding=1)

    assert silhouette_iou(true_alpha, cameras) == pytest.approx(1.0)
    assert 0.3 < silhouette_iou(eroded, cameras) < 0.95
    assert silhouette_iou(lambda c: torch.zeros(len(c), 1, 24, 24), cameras) == 0.0
    with pytest.raises(ValueError, match=r"\[V, 1, H, W\]"):
        silhouette_iou(lambda c: torch.zeros(len(c), 24, 24, 1), cameras)
