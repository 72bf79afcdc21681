"""Convergence policy on hard cases: speed (T/rounds) against fidelity to the sequential run.

For each case (``benchmarks/convergence_cases.py``: the demo regression, a densifying point toy, 3D Gaussians and a
hash-grid NeRF on the closed-form prior, and a harder setting of each) this trains two sequential runs
(``StepSeed(0)`` and ``StepSeed(1)``) and one Picard run per window size P and policy, all on one CPU process
(``window_size=P`` on one device: the slots of a round are evaluated one after the other, which gives the same
rounds and results as P slots spread over ranks). Printed per run:

- ``T/rounds``: steps per round; ``evals/T``: gradient evaluations (``training_step`` calls) per step;
- ``fidelity``: ‖outputs(Picard) − outputs(sequential)‖² / ‖outputs(seed 1) − outputs(sequential)‖², on held-out
  outputs (predictions, renders of novel views), so runs whose rows differ after densification compare;
- quality against the ground truth of the sequential run and of Picard (MSE, or novel-view PSNR in dB);
- the threshold at the end.

Policies (``--policies``) are named in ``POLICIES``; ``defaults`` is ``PicardStrategy()``'s own defaults.

Run from the repository root (one thread per process; a few minutes for the default selection):

    .venv/bin/python benchmarks/convergence.py
    .venv/bin/python benchmarks/convergence.py --cases gaussians nerf-hard --windows 8 --policies paper defaults
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_picard as lp
from benchmarks.convergence_cases import Case, cases, fidelity_ratio

POLICIES: dict[str, dict[str, object]] = {
    "defaults": {},
    "exact": {"tolerance": 0.0},
    # the paper's rule: ‖Δθ‖²/D, e₀ = 5e-6 (DreamPropeller's configs), e ← 0.9·e + 0.1·median(errors)
    "paper": {"threshold": 5e-6, "ema_decay": 0.9, "init": "copy"},
    "paper-capped": {"threshold": 5e-6, "ema_decay": 0.9, "init": "copy", "max_threshold": 5e-6},
    "absolute-1e-12": {"threshold": 1e-12, "ema_decay": 1.0, "init": "copy"},
    # errors in squared optimizer steps, fixed tolerance; "-x": init="extrapolate"
    "step-0.01": {"tolerance": 0.01, "init": "copy"},
    "step-0.1": {"tolerance": 0.1, "init": "copy"},
    "step-0.25": {"tolerance": 0.25, "init": "copy"},
    "step-0.5": {"tolerance": 0.5, "init": "copy"},
    "step-1": {"tolerance": 1.0, "init": "copy"},
    "step-4": {"tolerance": 4.0, "init": "copy"},
    "step-16": {"tolerance": 16.0, "init": "copy"},
    "step-0.1-x": {"tolerance": 0.1, "init": "extrapolate"},
    "step-1-x": {"tolerance": 1.0, "init": "extrapolate"},
    "step-4-x": {"tolerance": 4.0, "init": "extrapolate"},
    # errors in squared steps, the paper's EMA, capped at the tolerance
    "step-ema-1": {"tolerance": 1.0, "ema_decay": 0.9, "init": "copy", "max_threshold": 1.0},
    "step-ema-1-x": {"tolerance": 1.0, "ema_decay": 0.9, "init": "extrapolate", "max_threshold": 1.0},
}


class _Counter(pl.Callback):
    """Counts gradient evaluations and reads the window's rounds and threshold before teardown."""

    def __init__(self) -> None:
        self.rounds = 0
        self.threshold = float("nan")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window = getattr(trainer.strategy, "window", None)
        if window is not None:
            self.rounds, self.threshold = window.rounds, window.threshold


def fit(case: Case, strategy: lp.PicardStrategy | None, seed: int = 0) -> dict[str, object]:
    module = case.build()
    evaluations = [0]
    step = module.training_step

    def counted(*args, **kwargs):
        evaluations[0] += 1
        return step(*args, **kwargs)

    module.training_step = counted
    counter = _Counter()
    callbacks: list[pl.Callback] = [counter] if strategy is not None else [lp.StepSeed(seed), counter]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=case.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **({"strategy": strategy} if strategy is not None else {}),
    )
    start = time.perf_counter()
    trainer.fit(module, case.loader(case.steps))
    elapsed = time.perf_counter() - start
    rounds = counter.rounds if strategy is not None else case.steps
    return {
        "module": module,
        "outputs": case.outputs(module),
        "quality": case.quality(module),
        "rounds": rounds,
        "evaluations": evaluations[0],
        "threshold": counter.threshold,
        "seconds": elapsed,
    }


def strategy_for(policy: dict[str, object], window: int) -> lp.PicardStrategy:
    accepted = inspect.signature(lp.PicardStrategy).parameters
    unknown = [k for k in policy if k not in accepted]
    if unknown:
        raise SystemExit(f"this lightning_picard has no argument(s) {unknown}; choose another policy")
    return lp.PicardStrategy(window_size=window, seed=0, **policy)


def main(argv: list[str] | None = None) -> None:
    all_cases = cases()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(all_cases), choices=list(all_cases))
    parser.add_argument("--windows", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--policies", nargs="+", default=["defaults"], choices=list(POLICIES))
    parser.add_argument("--steps", type=int, default=0, help="override every case's number of steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_picard").setLevel(logging.ERROR)
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"nproc {os.cpu_count()}, torch {torch.__version__}, 1 thread, lightning_picard from "
        f"{Path(lp.__file__).parent}, load {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'case':<16} {'policy':<15} {'P':>3} {'rounds':>6} {'T/rounds':>8} {'evals/T':>7} {'fidelity':>9} "
        f"{'seq q':>8} {'picard q':>8} {'final e':>9} {'s':>6}"
    )
    print(header, flush=True)
    for name in args.cases:
        case = all_cases[name]
        if args.steps:
            case.steps = args.steps
        reference = fit(case, None, seed=0)
        other = fit(case, None, seed=1)
        spread = (other["outputs"] - reference["outputs"]).square().mean().item()
        print(
            f"{name:<16} {'sequential':<15} {'':>3} {case.steps:>6d} {1.0:>8.2f} {1.0:>7.2f} "
            f"{'(' + format(spread, '.2e') + ')':>9} {reference['quality']:>8.4g} {other['quality']:>8.4g} "
            f"{'':>9} {reference['seconds']:>6.1f}   ({case.quality_name}; fidelity column: seed spread, "
            "seed-1 quality in the last q column)",
            flush=True,
        )
        for policy in args.policies:
            for window in args.windows:
                run = fit(case, strategy_for(POLICIES[policy], window))
                ratio = fidelity_ratio(run["outputs"], reference["outputs"], other["outputs"])
                print(
                    f"{name:<16} {policy:<15} {window:>3d} {run['rounds']:>6d} {case.steps / run['rounds']:>8.2f} "
                    f"{run['evaluations'] / case.steps:>7.2f} {ratio:>9.2e} {reference['quality']:>8.4g} "
                    f"{run['quality']:>8.4g} {run['threshold']:>9.2e} {run['seconds']:>6.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
