"""The convergence heat map and the training curves as matplotlib figures, and ``lightning-picard plot``.

::

    lightning-picard plot RUN_DIR [--out DIR]   # RUN_DIR/plots/convergence.png and curves.png

Both read only the run folder's files: ``picard_rounds.csv`` (per-slot errors, :mod:`recipes.dashboard.rounds`)
and ``metrics.csv`` (the CSVLogger's, the default logger of ``lightning-picard fit``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.dashboard.rounds import ROUNDS_FILE, RoundRecord, error_matrix, read_rounds

METRICS_FILE = "metrics.csv"


class NothingToPlotError(ValueError):
    """The run folder's files hold nothing this plot draws."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def heat_map_figure(records: Sequence[RoundRecord], title: str = "Picard convergence") -> Any:
    """Error per window slot (rows) per round (columns) in log₁₀, with the steps each round accepted (its
    ``skip``: the slots up to the first error above the threshold) as a red line and, below, the threshold and the round's largest error."""
    import numpy as np

    if not records:
        raise NothingToPlotError("no Picard rounds to plot (a sequential run, or no round finished)")
    plt = _pyplot()
    matrix = np.array(error_matrix(records), dtype=float).T  # [slots, rounds]
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    floor = positive.min() / 10 if positive.size else 1e-12
    logged = np.log10(np.where(np.isfinite(matrix), np.maximum(matrix, floor), np.nan))
    rounds = np.arange(len(records))
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}, constrained_layout=True
    )
    image = top.imshow(
        logged,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(-0.5, len(records) - 0.5, 0.5, matrix.shape[0] + 0.5),
        interpolation="nearest",
    )
    figure.colorbar(image, ax=top, label="log10 error")
    skips = np.array([r.skip for r in records], dtype=float)
    edges = np.arange(len(records) + 1) - 0.5
    top.stairs(skips + 0.5, edges, baseline=None, color="tab:red", linewidth=2, label="steps accepted (skip)")
    top.set_ylim(0.5, matrix.shape[0] + 0.5)
    top.set_ylabel("window slot j (step τ + j)")
    top.set_title(title)
    top.legend(loc="upper right", fontsize=8, framealpha=0.6)
    threshold = np.array([r.threshold for r in records], dtype=float)
    worst = np.array([max((e for e in r.errors if math.isfinite(e)), default=math.nan) for r in records])
    bottom.semilogy(rounds, np.maximum(threshold, floor), label="threshold", color="tab:red")
    bottom.semilogy(rounds, np.maximum(worst, floor), label="largest error", color="tab:blue", alpha=0.7)
    bottom.set_xlabel("round")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(fontsize=8)
    return figure


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metric → [(step, value)]`` from a CSVLogger ``metrics.csv`` (rows without the metric skipped)."""
    with Path(path).open(newline="") as file:
        rows = list(csv.DictReader(file))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if not row.get("step"):
            continue
        step = int(float(row["step"]))
        for name, value in row.items():
            if name in ("step", "epoch") or value in ("", None):
                continue
            series.setdefault(name, []).append((step, float(value)))
    return series


CURVES = (
    ("picard/skip", "picard/steps_per_round"),
    ("picard/threshold", "picard/error_median", "picard/error_max"),
    ("picard/rounds", "picard/window_start"),
)


def curves_figure(series: dict[str, list[tuple[int, float]]]) -> Any:
    """One panel per group of ``picard/*`` metrics present and one of the losses and one of the other ``train/*`` values, over the optimizer
    step (τ): the same axis as a sequential run's curves."""
    plt = _pyplot()
    groups = [[n for n in group if n in series] for group in CURVES]
    groups = [g for g in groups if g]
    train = sorted(n for n in series if n.startswith("train/"))
    losses = [n for n in train if "loss" in n]
    groups += [g for g in (losses, [n for n in train if n not in losses]) if g]
    if not groups:
        raise NothingToPlotError("metrics.csv has no picard/* or train/* metrics to plot")
    figure, axes = plt.subplots(len(groups), 1, figsize=(8, 2.4 * len(groups)), sharex=True, squeeze=False)
    for axis, group in zip(axes[:, 0], groups, strict=True):
        logarithmic = any("error" in n or "threshold" in n for n in group)
        for name in group:
            steps, values = zip(*series[name], strict=True)
            if logarithmic:
                axis.semilogy(steps, [max(v, 1e-30) for v in values], marker=".", label=name)
            else:
                axis.plot(steps, values, marker=".", label=name)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step τ")
    figure.tight_layout()
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write ``curves.png`` (from ``metrics.csv``) and ``convergence.png`` (from ``picard_rounds.csv``, Picard runs
    only) into ``out``. Default is ``RUN_DIR/plots``."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        raise FileNotFoundError(
            f"{run_dir} has no {METRICS_FILE}; pass a run folder of `lightning-picard fit` run with the default "
            "CSV logger (or with --trainer.logger=CSVLogger beside another logger)"
        )
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    figure = curves_figure(read_metrics(metrics))
    figure.savefig(out / "curves.png", dpi=110)
    plt.close(figure)
    written.append(out / "curves.png")
    records = read_rounds(run_dir / ROUNDS_FILE)
    if records:
        figure = heat_map_figure(records, title=f"Picard convergence: {run_dir.name}")
        figure.savefig(out / "convergence.png", dpi=110)
        plt.close(figure)
        written.append(out / "convergence.png")
    return written


def main(argv: list[str]) -> list[Path]:
    """``lightning-picard plot RUN_DIR [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-picard plot",
        description="Render a run's convergence heat map and curves to PNG from its metrics files.",
    )
    parser.add_argument("run_dir", help="a run folder of `lightning-picard fit`")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    paths = plot_run(args.run_dir, args.out)
    for path in paths:
        print(f"Wrote {path}", file=sys.stderr)
    if len(paths) == 1:
        print(f"No {ROUNDS_FILE} in {args.run_dir} (a sequential run): no heat map.", file=sys.stderr)
    return paths
