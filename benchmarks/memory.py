"""Peak memory of one rank's Picard state: P = 8 slots on 2 ranks (4 slots per rank), D = 1e7 parameters.

Builds exactly what a rank holds during a round — the module's parameters re-seated in ``FlatParameters``, the
``PicardWindow`` ring buffer, the gathered gradient rows (this rank's rows are a view into them, as
in the strategy's in-place all-gather), Adam's state and the ``OptimizerSnapshot`` — runs
a round that stops at slot 1, one with a second replay and one that accepts every guess, and reports the peak
resident-memory growth in units of |θ| = 4·D bytes.

Run: ``.venv/bin/python benchmarks/memory.py [--params 10000000] [--window 8] [--world 2] [--init copy]``
"""

from __future__ import annotations

import argparse
import math
import resource

import torch

from lightning_picard.flat import FlatParameters
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(params: int, window: int, world: int, init: str) -> dict[str, float]:
    torch.set_num_threads(1)
    theta_bytes = 4 * params
    baseline = peak_rss_bytes()
    parameters = [torch.nn.Parameter(torch.randn(params // 4)) for _ in range(4)]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam state: 2·|θ|
    for p in parameters:
        p.grad = None
    after_model = peak_rss_bytes()

    flat = FlatParameters(parameters)
    picard = PicardWindow(flat, window, threshold=1e-9, ema_decay=0.9, init=init)  # type: ignore[arg-type]
    snapshot = OptimizerSnapshot(optimizer)
    slots_per_rank = math.ceil(window / world)
    # The strategy's in-place gather: this rank's rows are its chunk of the gathered buffer.
    gathered = flat.new_rows(world * slots_per_rank)
    gathered[:, : flat.numel].normal_()
    gathered[:, flat.numel :] = 1.0

    def gradient_row(j: int) -> torch.Tensor:
        return gathered[(j % world) * slots_per_rank + j // world]

    picard.run_round(0, window, gradient_row, lambda j: optimizer.step(), snapshot)  # guesses far: skip = 1
    picard.guess(window).fill_(float("nan"))
    picard.run_round(1, window, gradient_row, lambda j: optimizer.step(), snapshot)  # second replay
    picard.threshold, picard.adaptive = math.inf, False
    picard.run_round(2, window, gradient_row, lambda j: optimizer.step(), snapshot)  # skip = P
    after_rounds = peak_rss_bytes()
    total = after_rounds - baseline
    return {
        "model_and_adam": (after_model - baseline) / theta_bytes,
        "picard_extra": (after_rounds - after_model) / theta_bytes,
        "total": total / theta_bytes,
        "gib_total": total / 2**30,
        "slots_per_rank": slots_per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--init", choices=("copy", "extrapolate"), default="copy")
    args = parser.parse_args()
    result = measure(args.params, args.window, args.world, args.init)
    print(
        f"D = {args.params:,}, P = {args.window}, world = {args.world} ({result['slots_per_rank']} slots/rank), "
        f"init = {args.init}"
    )
    print(f"parameters + Adam state:           {result['model_and_adam']:.2f} |θ|")
    print(f"Picard state and buffers (peak):   {result['picard_extra']:.2f} |θ|")
    print(f"total per rank (peak):             {result['total']:.2f} |θ| = {result['gib_total']:.2f} GiB")


if __name__ == "__main__":
    main()
