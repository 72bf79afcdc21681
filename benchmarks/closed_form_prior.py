"""Measure the closed-form prior of the procedural object: its cost, and the quality SDS reaches on it.

    .venv/bin/python benchmarks/closed_form_prior.py --resolutions 32 64 --batch 2 --threads 1
    .venv/bin/python benchmarks/closed_form_prior.py --quality-steps 300 --modes photo r20 k10 uncond

Timing prints one row per resolution: the reference set's size and the median time of ``predict_noise``
(view conditioned) and ``predict_noise_pair`` (conditional + unconditional, for CFG), in milliseconds.

Quality (``--quality-steps N``) fits 300 DreamGaussian Gaussians at 32 × 32 for N steps, B = 2 views per
step, every step's randomness from ``Generator().manual_seed(seed + step)``, and prints the held-out
novel-view PSNR/SSIM every 50 steps. Modes: ``photo`` is MSE to random reference views (the upper
bound); the others are SDS (w = 1 − ᾱ, t ∈ [20, 980], no CFG) from random cameras (azimuth U[0, 360),
elevation U[−10, 50]) on the prior with a σ = 10° kernel (``k10``), restricted to 20° (``r20``), or
unconditioned (``uncond``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from recipes.data.procedural import held_out_cameras, reference_cameras, spherical_cameras
from recipes.eval import novel_view_quality
from recipes.guidance.closed_form import ClosedFormPrior

PRIOR_SETTINGS = {
    "photo": {"sigma_deg": 10.0},
    "k10": {"sigma_deg": 10.0},
    "r20": {"sigma_deg": None, "restrict_deg": 20.0},
    "uncond": {"sigma_deg": 10.0},
}


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def time_prior(resolutions: list[int], batch: int, repeats: int, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    print("resolution | refs x dims | build s | predict_noise ms | predict_noise_pair ms")
    for size in resolutions:
        start = time.perf_counter()
        prior = ClosedFormPrior.from_procedural_object(height=size).to(device)
        build_s = time.perf_counter() - start
        cameras = held_out_cameras(num_views=batch, height=size, width=size).to(device)
        x_t = torch.randn(batch, 3, size, size, generator=generator).to(device)
        t = torch.randint(20, 981, (batch,), generator=generator).to(device)
        with torch.no_grad():
            single = median_ms(partial(prior.predict_noise, x_t, t, cameras), repeats, device)
            pair = median_ms(partial(prior.predict_noise_pair, x_t, t, cameras, None), repeats, device)
        dims = prior.references[0].numel()
        print(
            f"{size:>10} | {prior.num_references:>4} x {dims:<5} | {build_s:7.3f} | {single:16.3f} | {pair:21.3f}"
        )


def fit_gaussians(mode: str, steps: int, seed: int) -> None:
    from recipes.geometry.gaussians import GaussianLearningRates, Gaussians
    from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig
    from recipes.render.gaussians_raster import render_gaussians

    prior = ClosedFormPrior.from_procedural_object(height=32, **PRIOR_SETTINGS[mode])
    sds = ScoreDistillationSampling(prior, SDSConfig(guidance_scale=1.0))
    references = reference_cameras()
    gaussians = Gaussians(num_points=300, radius=0.6, seed=0)
    optimizer, scheduler = gaussians.configure_optimizer(GaussianLearningRates(spatial_lr_scale=1.0))
    white = torch.ones(3)

    def render(cameras):
        return render_gaussians(gaussians, cameras, background=white).rgb.permute(0, 3, 1, 2)

    start = time.perf_counter()
    for step in range(steps + 1):
        if step % 50 == 0 or step == steps:
            quality = novel_view_quality(render)
            elapsed = time.perf_counter() - start
            print(
                f"{mode:>6} step {step:4d}  PSNR {quality.psnr:6.2f}  SSIM {quality.ssim:.3f}  {elapsed:6.1f} s"
            )
        if step == steps:
            break
        generator = torch.Generator().manual_seed(seed + step)
        if mode == "photo":
            index = torch.randint(0, len(references), (2,), generator=generator)
            loss = 0.5 * (render(references[index]) * 2 - 1 - prior.references[index]).square().sum() / 2
        else:
            elevation = torch.rand(2, generator=generator) * 60 - 10
            azimuth = torch.rand(2, generator=generator) * 360
            cameras = spherical_cameras(elevation, azimuth)
            condition = None if mode == "uncond" else cameras
            loss = sds(render(cameras) * 2 - 1, condition, None, global_step=step, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quality-steps", type=int, default=0, help="also fit Gaussians for this many steps")
    parser.add_argument(
        "--modes", nargs="+", default=["photo", "r20", "k10", "uncond"], choices=PRIOR_SETTINGS
    )
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} torch={torch.__version__}")
    time_prior(args.resolutions, args.batch, args.repeats, device)
    for mode in args.modes if args.quality_steps > 0 else []:
        fit_gaussians(mode, args.quality_steps, args.seed)


if __name__ == "__main__":
    main()
