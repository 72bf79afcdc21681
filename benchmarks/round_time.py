"""Time one ``PicardWindow.run_round`` in a single process (no Lightning, no collectives).

P = 8 slots whose guesses are all accepted (threshold ∞), ``torch.optim.Adam`` (default implementation) over four
parameter tensors of D / 4 values each, constant gradient rows, one thread. Prints the min and median of
``--rounds`` rounds. Used to check that changes to the window's bookkeeping do not slow the replay: run it on two
commits alternately (``PYTHONPATH=<checkout> python benchmarks/round_time.py``).
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_picard.flat import FlatParameters
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="D, the number of parameters")
    parser.add_argument("--window", type=int, default=8, help="P, slots per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--error-units",
        choices=["absolute", "step"],
        default="absolute",
        help="the paper's ‖Δθ‖²/D or the default policy's errors in optimizer steps",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = [torch.nn.Parameter(torch.randn(args.params // 4)) for _ in range(4)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    flat = FlatParameters(params)
    window = PicardWindow(flat, args.window, float("inf"), 0.9, error_units=args.error_units)
    snapshot = OptimizerSnapshot(optimizer)
    rows = flat.new_rows(args.window)
    rows[:, :] = 1e-3
    presence = [[True] * len(params)] * args.window
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        window.run_round(0, args.window, rows.__getitem__, lambda j: optimizer.step(), snapshot, presence)
        times.append(time.perf_counter() - start)
    times.sort()
    print(
        f"D={args.params:,} P={args.window} {args.error_units}: min {times[0] * 1e3:.2f} ms, "
        f"median {times[len(times) // 2] * 1e3:.2f} ms over {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
