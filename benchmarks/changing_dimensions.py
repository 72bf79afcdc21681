"""Picard through densify/prune: rounds and result for the growing-bumps toy of the test suite.

``tests/toy_resizing.GrowingBumps`` (bumps cloned and pruned every 3 steps, an occupancy grid every 4, a
progressive level, a step output) trained for ``--steps`` steps on one CPU rank: sequentially with ``StepSeed``,
then with ``PicardStrategy(window_size=P)`` for each threshold and ``init``. Prints, per run, the rounds, the
steps per round, the final number of bumps and the held-out loss next to the sequential run's.

Run from the repository root: ``.venv/bin/python benchmarks/changing_dimensions.py [--steps 60] [--window 8]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_picard as lp
from tests.toy_resizing import GrowingBumps, step_data


def held_out_loss(module: GrowingBumps) -> float:
    generator = torch.Generator().manual_seed(99)
    x = torch.rand(2048, 2, generator=generator) * 2 - 1
    target = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])
    with torch.no_grad():
        return (module(x) - target).square().mean().item()


def fit(steps: int, strategy=None) -> tuple[GrowingBumps, float, float]:
    module = GrowingBumps()
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if strategy is None:
        trainer = pl.Trainer(callbacks=[lp.StepSeed(0)], **kwargs)
    else:
        trainer = pl.Trainer(strategy=strategy, **kwargs)
    start = time.perf_counter()
    trainer.fit(module, step_data(steps))
    elapsed = time.perf_counter() - start
    rounds = trainer.callback_metrics.get("picard/rounds")
    return module, float(rounds) if rounds is not None else float(steps), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 1e-5, 1e-4, 1e-3])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    reference, _, _ = fit(args.steps)
    print(f"GrowingBumps, {args.steps} steps, P = {args.window}, one CPU rank; torch {torch.__version__}")
    print(
        f"sequential: {reference.heights.shape[0]} bumps after {len(reference.resizes)} densifications, "
        f"held-out loss {held_out_loss(reference):.4f}\n"
    )
    print("| init | threshold | rounds | steps/round | bumps | held-out loss | equal to sequential |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for init in ("copy", "extrapolate"):
        for threshold in args.thresholds:
            strategy = lp.PicardStrategy(window_size=args.window, threshold=threshold, init=init)
            module, rounds, _ = fit(args.steps, strategy)
            same = module.heights.shape == reference.heights.shape and all(
                torch.equal(a, b) for a, b in zip(module.parameters(), reference.parameters())
            )
            print(
                f"| {init} | {threshold:g} | {rounds:.0f} | {args.steps / rounds:.2f} | {module.heights.shape[0]} | "
                f"{held_out_loss(module):.4f} | {'bit for bit' if same else 'no'} |"
            )


if __name__ == "__main__":
    main()
