"""Time the closed-form prior of the procedural object: one ε̂ evaluation, conditional and CFG pair.

    .venv/bin/python benchmarks/closed_form_prior.py --resolutions 32 64 --batch 2 --threads 1

Prints one row per resolution: the reference set's size and the median time of ``predict_noise`` (view
conditioned) and ``predict_noise_pair`` (conditional + unconditional, for CFG), in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from recipes.data.procedural import held_out_cameras
from recipes.guidance.closed_form import ClosedFormPrior


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} torch={torch.__version__}")
    print("resolution | refs x dims | build s | predict_noise ms | predict_noise_pair ms")
    for size in args.resolutions:
        start = time.perf_counter()
        prior = ClosedFormPrior.from_procedural_object(height=size).to(device)
        build_s = time.perf_counter() - start
        cameras = held_out_cameras(num_views=args.batch, height=size, width=size).to(device)
        x_t = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
        t = torch.randint(20, 981, (args.batch,), generator=generator).to(device)
        with torch.no_grad():
            single = median_ms(partial(prior.predict_noise, x_t, t, cameras), args.repeats, device)
            pair = median_ms(partial(prior.predict_noise_pair, x_t, t, cameras, None), args.repeats, device)
        dims = prior.references[0].numel()
        print(
            f"{size:>10} | {prior.num_references:>4} x {dims:<5} | {build_s:7.3f} | {single:16.3f} | {pair:21.3f}"
        )


if __name__ == "__main__":
    main()
