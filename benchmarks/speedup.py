"""Picard's speedup on every recipe, on the closed-form prior: T/rounds, gradient evaluations, thresholds, fidelity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speedup.py --out /tmp/speedup            # every recipe
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speedup.py --recipes dreamgaussian asd --windows 2 8 --steps 60
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speedup.py --wall-clock --steps 50 --out /tmp/wall
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speedup.py --recipes asd --windows 8 --harder-windows \
        --policies paper --tolerances 0.01 0.1 1 10 --steps 30 --out /tmp/frontier                  # the trade-off

**Algorithmic mode** (the default). For each recipe's CPU-size config (``RECIPES``, ``--size``: by default the demo
configs of the Gaussian recipes and the 16 × 16 smoke configs of the others) it trains, in one process with one thread and a plain ``Trainer`` (no validation, no checkpoints),
two sequential runs (seed 0, the reference, and seed 1: other step seeds and cameras, the yardstick) and one Picard
run per window P (``--windows``) and policy (``--policies``): ``window_size=P`` on one device evaluates the P slots
of a round one after the other, which gives the rounds and results of P slots spread over P ranks. A ``harder``
setting (``Recipe.harder``: three times the learning rate, batch 4, densification where the scene has it) is run
the same way at ``--harder-windows``. Per run it reports:

- ``T/rounds`` (steps per round) and ``evals/T``, the gradient evaluations (``backward`` calls) per step;
- the threshold trajectory after each round: first, median and last;
- novel-view PSNR/SSIM (``recipes.eval.novel_view_quality``, the 8 held-out views);
- the fidelity ratio: ``‖θ(Picard) − θ(seq)‖² / ‖θ(seed 1) − θ(seq)‖²`` over the Picard-state parameters where
  the runs' parameter shapes agree (``fidelity_params``), and the same ratio over the held-out renders
  (``fidelity_renders``). ``fidelity`` is the renders' ratio for Gaussians (after densification their rows are
  other points, even where the counts agree), the parameters' for the others.

Policies: ``defaults`` is ``PicardStrategy(window_size=P)``'s own convergence policy; ``paper`` is DreamPropeller's
rule: threshold 5e-4 on ‖Δθ‖²/D for Gaussian scenes and 5e-6 for the others, γ 0.9, median.

**The speed/fidelity frontier** (``--tolerances``). Each value t adds the policy ``tolerance=t``
(``PicardStrategy(window_size=P, tolerance=t)``, fixed; ``tolerance=0.1`` is the ``defaults`` policy), run and
measured like the others. The tables then also carry ``strides``, the steps accepted in each round, and
``frontier.png`` plots the fidelity ratio (log) against T/rounds, one line per recipe and setting through the
tolerances, the ``paper`` policy's point marked, the target region (T/rounds ≥ 0.8·P, fidelity ≤ 1%) shaded.
``--replot`` redraws ``speedup.png`` and ``frontier.png`` from ``--out``'s ``speedup.csv`` without running anything.

**Wall-clock mode** (``--wall-clock``). Each recipe through ``lightning-picard fit``, sequentially
(``--trainer.strategy=auto``) and on 2 CPU processes (``--trainer.strategy=picard_fork --trainer.devices=2``: one
slot per rank, the default policy), one after the other in alternating order, one thread per process, with the load
average before each; times are the runs' ``fit_seconds`` (``run.json``) and the whole command's wall time.

Both modes write ``speedup.csv``, ``speedup.md`` (or ``wall_clock.*``) and, in the algorithmic mode, ``speedup.png``
(T/rounds against P per recipe) and, with ``--tolerances``, ``frontier.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convergence_cases import fidelity_ratio
from lightning_picard import PicardStrategy, at_round_end
from lightning_picard.hooks import picard_parameters
from recipes.cli import RecipeCLI
from recipes.data.procedural import held_out_cameras
from recipes.demo import fit_runs, render_chw
from recipes.eval import novel_view_quality

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SCENE = "--model.init_args.scene.init_args"
CAMERAS = "--data.init_args.cameras"


@dataclass
class Recipe:
    """A recipe's CPU-size configs (``demo``: the configs that learn the object; ``smoke``: tiny, 16 × 16) and the
    overrides of its harder setting."""

    name: str
    demo: str | None = None
    gaussians: bool = False
    harder: list[str] = field(default_factory=list)

    def config(self, size: str) -> Path:
        """The ``small`` size takes the demo config of Gaussian recipes (cheap) and the smoke config of the others."""
        if size == "smoke" or (size == "small" and not self.gaussians) or self.demo is None:
            return CONFIGS / "smoke" / f"{self.name}.yaml"
        return CONFIGS / "demo" / f"{self.demo}.yaml"


NERF_HARDER = [f"{SCENE}.optimizer.lr=0.03", f"{CAMERAS}.batch_size=4"]
"""Three times the field's learning rate (0.01 in every NeRF config here), batch 4."""
GAUSSIAN_HARDER = [
    f"{SCENE}.learning_rates.spatial_lr_scale=90.0",
    f"{SCENE}.learning_rates.feature_lr=0.15",
    f"{SCENE}.densification.interval=20",
    f"{SCENE}.densification.start_step=0",
    f"{CAMERAS}.batch_size=4",
]
"""Three times the demo's position and colour learning rates, densification every 20 steps, batch 4."""

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("dreamgaussian", "dreamgaussian", gaussians=True, harder=GAUSSIAN_HARDER),
        Recipe("dreamfusion", harder=NERF_HARDER),
        Recipe("magic3d-coarse", "magic3d-coarse", harder=NERF_HARDER),
        Recipe(
            "textmesh", "textmesh", harder=[f"{SCENE}.optimizer.encoding_lr=0.03", f"{CAMERAS}.batch_size=4"]
        ),
        Recipe("asd", "asd", harder=NERF_HARDER),
        Recipe("prolificdreamer-coarse", "prolificdreamer", harder=NERF_HARDER),
        Recipe("zero123-nerf", "zero123-nerf", harder=NERF_HARDER),
        Recipe("zero123-gaussians", "zero123-gaussians", gaussians=True, harder=GAUSSIAN_HARDER),
    )
}
"""``dreamfusion`` has no demo config; ``prolificdreamer-coarse`` is VSD (its demo config is demo/prolificdreamer.yaml)."""

POLICIES = ("defaults", "paper")
EXACT = "exact"
"""``tolerance=0``: the sequential run bit for bit (a check of the measures, not a default)."""
TOLERANCE = "tolerance="
"""Prefix of the swept policies: ``tolerance=0.3`` is ``PicardStrategy(tolerance=0.3)``."""
SEED1 = ["--model.seed=1", "--data.init_args.seed=1"]
COLUMNS = (
    "recipe",
    "setting",
    "policy",
    "P",
    "T",
    "rounds",
    "T/rounds",
    "evaluations",
    "evals/T",
    "threshold_first",
    "threshold_median",
    "threshold_last",
    "psnr",
    "ssim",
    "seq_psnr",
    "seed1_psnr",
    "psnr_within_seed_spread",
    "fidelity_params",
    "fidelity_renders",
    "fidelity",
    "fit_seconds",
)
FRONTIER_COLUMNS = (*COLUMNS, "late_T/rounds", "strides")
"""The tables' columns with ``--tolerances``: ``strides`` are the steps accepted in each round, ``late_T/rounds``
their mean over the second half of the run (``late_stride``)."""


def tolerance_policy(tolerance: float) -> str:
    """The name of the swept policy with ``tolerance`` (``tolerance=0.3``)."""
    return f"{TOLERANCE}{tolerance:g}"


def policy_arguments(policy: str, recipe: Recipe) -> dict[str, Any]:
    """``PicardStrategy`` arguments of ``policy`` for ``recipe``: ``defaults``, ``paper``, ``exact`` or
    ``tolerance=t``."""
    if policy.startswith(TOLERANCE):
        return {"tolerance": float(policy.removeprefix(TOLERANCE))}
    if policy == "defaults":
        return {}
    if policy == "paper":
        return {"threshold": 5e-4 if recipe.gaussians else 5e-6, "ema_decay": 0.9, "aggregate": "median"}
    if policy == EXACT:
        return {"tolerance": 0.0}
    raise ValueError(f"unknown policy {policy!r}: choose from {(*POLICIES, EXACT)} or {TOLERANCE}t")


class _RunRecord(pl.Callback):
    """Counts gradient evaluations (``backward`` calls) and records the threshold and the steps accepted after every
    round."""

    def __init__(self) -> None:
        self.evaluations = 0
        self.thresholds: list[float] = []
        self.strides: list[int] = []
        self.rounds = 0
        self._steps = 0

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self.evaluations += 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        window = getattr(trainer.strategy, "window", None)
        if window is not None and at_round_end(trainer):
            self.thresholds.append(float(window.threshold))
            self.strides.append(trainer.global_step - self._steps)
            self._steps = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window = getattr(trainer.strategy, "window", None)
        self.rounds = window.rounds if window is not None else trainer.global_step


@dataclass
class Run:
    """What a fit leaves for the measures."""

    steps: int
    rounds: int
    evaluations: int
    thresholds: list[float]
    strides: list[int]
    seconds: float
    psnr: float
    ssim: float
    renders: torch.Tensor
    parameters: list[torch.Tensor]


def fit(
    recipe: Recipe,
    size: str,
    overrides: list[str],
    steps: int,
    run_dir: Path,
    window: int | None,
    policy: str | None,
) -> Run:
    """Fit ``recipe`` for ``steps`` steps in this process: sequential if ``window`` is None, else Picard with
    ``window_size=window`` on one device under ``policy``."""
    cli = RecipeCLI(
        args=["-c", str(recipe.config(size)), *overrides, f"--data.init_args.num_steps={steps}"],
        run=False,
        save_config_callback=None,
    )
    model, datamodule = cli.model, cli.datamodule
    record = _RunRecord()
    strategy: Any = "auto"
    if window is not None:
        strategy = PicardStrategy(window_size=window, seed=model.seed, **policy_arguments(policy, recipe))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[record],
        default_root_dir=str(run_dir),
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    model.eval()
    quality = novel_view_quality(lambda cameras: render_chw(model, cameras))
    return Run(
        steps=trainer.global_step,
        rounds=record.rounds,
        evaluations=record.evaluations,
        thresholds=record.thresholds,
        strides=record.strides,
        seconds=seconds,
        psnr=quality.psnr,
        ssim=quality.ssim,
        renders=render_chw(model, held_out_cameras()),
        parameters=[p.detach().clone() for p in picard_parameters(model)],
    )


def parameter_ratio(picard: Run, sequential: Run, seed1: Run) -> float:
    """The fidelity ratio over the Picard-state parameters, or NaN where their shapes differ (densification)."""
    shapes = [[p.shape for p in run.parameters] for run in (picard, sequential, seed1)]
    if not shapes[0] == shapes[1] == shapes[2]:
        return math.nan
    flat = [torch.cat([p.flatten() for p in run.parameters]) for run in (picard, sequential, seed1)]
    return fidelity_ratio(*flat)


def late_stride(strides: list[int], steps: int) -> float:
    """Mean steps per round over the rounds that start at step ``steps // 2`` or later, the last round left out (the
    end of the run shortens its window), or NaN where there are none: T/rounds once the first, larger steps are
    past."""
    starts = [sum(strides[:i]) for i in range(len(strides))]
    late = [s for start, s in zip(starts[:-1], strides[:-1], strict=True) if start >= steps // 2]
    return statistics.mean(late) if late else math.nan


def row(recipe: str, setting: str, policy: str, window: int | None, run: Run, seq: Run, seed1: Run) -> dict:
    """One table row of ``run`` against the setting's sequential runs. ``fidelity`` is the renders' ratio for
    Gaussians (their rows need not be the same points even where the counts agree), else the parameters'."""
    thresholds = run.thresholds or [math.nan]
    params = parameter_ratio(run, seq, seed1) if window is not None else math.nan
    renders = fidelity_ratio(run.renders, seq.renders, seed1.renders) if window is not None else math.nan
    return {
        "recipe": recipe,
        "setting": setting,
        "policy": policy,
        "P": window or 1,
        "T": run.steps,
        "rounds": run.rounds,
        "T/rounds": run.steps / run.rounds if run.rounds else math.nan,
        "evaluations": run.evaluations,
        "evals/T": run.evaluations / run.steps if run.steps else math.nan,
        "threshold_first": thresholds[0],
        "threshold_median": statistics.median(thresholds),
        "threshold_last": thresholds[-1],
        "psnr": run.psnr,
        "ssim": run.ssim,
        "seq_psnr": seq.psnr,
        "seed1_psnr": seed1.psnr,
        "psnr_within_seed_spread": abs(run.psnr - seq.psnr) <= abs(seed1.psnr - seq.psnr),
        "fidelity_params": params,
        "fidelity_renders": renders,
        "fidelity": renders if RECIPES[recipe].gaussians or math.isnan(params) else params,
        "fit_seconds": run.seconds,
        "late_T/rounds": late_stride(run.strides, run.steps) if window is not None else math.nan,
        "strides": " ".join(map(str, run.strides)),
    }


def measure_recipe(name: str, args: dict[str, Any]) -> list[dict]:
    """Every run of one recipe (a worker's job): sequential pair and Picard runs, base and harder settings.

    One thread and quiet loggers while it runs; the caller's settings are restored afterwards (it may be a test)."""
    threads = torch.get_num_threads()
    loggers = {
        name: logging.getLogger(name)
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_picard")
    }
    levels = {name: logger.level for name, logger in loggers.items()}
    torch.set_num_threads(1)
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _measure_recipe(name, args)
    finally:
        torch.set_num_threads(threads)
        for key, logger in loggers.items():
            logger.setLevel(levels[key])


def _measure_recipe(name: str, args: dict[str, Any]) -> list[dict]:
    recipe = RECIPES[name]
    out = Path(args["out"]) / name
    settings = {"base": ([], args["windows"])}
    if args["harder_windows"]:
        settings["harder"] = (recipe.harder, args["harder_windows"])
    rows = []
    for setting, (overrides, windows) in settings.items():
        folder = out / setting
        size, steps = args["size"], args["steps"]
        seq = fit(recipe, size, overrides, steps, folder / "sequential", None, None)
        seed1 = fit(recipe, size, [*overrides, *SEED1], steps, folder / "seed1", None, None)
        rows.append(row(name, setting, "sequential", None, seq, seq, seed1))
        rows.append(row(name, setting, "sequential seed 1", None, seed1, seq, seed1))
        for policy in args["policies"]:
            for window in windows:
                run = fit(recipe, size, overrides, steps, folder / f"{policy}_P{window}", window, policy)
                rows.append(row(name, setting, policy, window, run, seq, seed1))
                print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    """``rows`` as a Markdown table of ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> Path:
    """T/rounds against P, one line per recipe, setting and policy, with the ceiling T/rounds = P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [p for p in (*POLICIES, EXACT) if any(r["policy"] == p for r in rows)]
    picard = [r for r in rows if r["policy"] in policies]
    figure, axes = plt.subplots(1, max(len(policies), 1), figsize=(11, 4.5), sharey=True, squeeze=False)
    for axis, policy in zip(axes[0], policies, strict=False):
        for key in sorted({(r["recipe"], r["setting"]) for r in picard if r["policy"] == policy}):
            points = sorted(
                (r["P"], r["T/rounds"])
                for r in picard
                if (r["recipe"], r["setting"]) == key and r["policy"] == policy
            )
            style = "-o" if key[1] == "base" else "--x"
            axis.plot(*zip(*points, strict=True), style, label=f"{key[0]} ({key[1]})")
        windows = sorted({r["P"] for r in picard})
        if windows:
            axis.plot(windows, windows, "k:", label="ceiling T/rounds = P")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("window P")
        axis.set_title(f"policy: {policy}")
    axes[0][0].set_ylabel("T / rounds")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


TARGET_FIDELITY = 0.01
"""The issue's fidelity target: at most 1% of the seed-to-seed distance."""
TARGET_STRIDE = 0.8
"""The issue's speed target: T/rounds at least 0.8·P."""


def frontier_plot(rows: list[dict], path: Path) -> Path:
    """Fidelity ratio (log x, in % of the seed spread) against T/rounds: one panel per window P and setting, one line
    per recipe through its ``tolerance=t`` rows (each point labelled with t), its ``paper`` row as a star, the target
    region (T/rounds ≥ 0.8·P, fidelity ≤ 1%) shaded, T/rounds = P and (P + 1)/2 dotted.

    Points with fidelity 0 (``tolerance=0``) have no place on a log axis and are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [r for r in rows if r["policy"].startswith(TOLERANCE)]
    order = {"base": 0, "harder": 1}
    panels = sorted({(r["P"], r["setting"]) for r in swept}, key=lambda k: (k[0], order.get(k[1], 2), k[1]))
    recipes = list(dict.fromkeys(r["recipe"] for r in swept))
    colours = {name: f"C{i % 10}" for i, name in enumerate(recipes)}
    count = max(len(panels), 1)
    figure, axes = plt.subplots(1, count, figsize=(5.5 * count + 2.2, 5), squeeze=False)
    for axis, (window, setting) in zip(axes[0], panels, strict=False):
        plotted = []
        for recipe in recipes:
            mine = [r for r in rows if (r["recipe"], r["setting"], r["P"]) == (recipe, setting, window)]
            points = sorted(
                (float(r["policy"].removeprefix(TOLERANCE)), 100 * r["fidelity"], r["T/rounds"])
                for r in mine
                if r["policy"].startswith(TOLERANCE) and r["fidelity"] > 0 and math.isfinite(r["fidelity"])
            )
            if points:
                _, xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, "-o", color=colours[recipe], ms=4, lw=1.2, label=recipe)
                plotted += xs
                for tolerance, x, y in points:
                    axis.annotate(
                        f"{tolerance:g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points"
                    )
            for r in mine:
                if r["policy"] == "paper" and r["fidelity"] > 0 and math.isfinite(r["fidelity"]):
                    axis.plot(
                        100 * r["fidelity"],
                        r["T/rounds"],
                        "*",
                        color=colours[recipe],
                        ms=13,
                        mec="k",
                        mew=0.5,
                    )
                    plotted.append(100 * r["fidelity"])
        low = min([*plotted, 100 * TARGET_FIDELITY]) / 3
        high = max([*plotted, 100 * TARGET_FIDELITY]) * 3
        axis.set_xscale("log")
        axis.set_xlim(low, high)
        axis.set_ylim(1, window + 0.5)
        axis.fill_between(
            [low, 100 * TARGET_FIDELITY],
            TARGET_STRIDE * window,
            window + 0.5,
            color="g",
            alpha=0.15,
            label=f"target: T/rounds ≥ {TARGET_STRIDE:g}·P, fidelity ≤ {100 * TARGET_FIDELITY:g}%",
        )
        axis.axhline(window, color="k", ls=":", lw=1, label="ceiling T/rounds = P")
        axis.axhline((window + 1) / 2, color="grey", ls="-.", lw=1, label="(P + 1)/2")
        axis.set_xlabel("fidelity ratio: ‖Picard − seq‖² / ‖seed 1 − seq‖² (%, log)")
        axis.set_title(f"P = {window}, {setting} setting")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("T / rounds")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for axis in axes[0][1:]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    handles.append(plt.Line2D([], [], ls="", marker="*", color="w", mec="k", ms=11))
    labels.append("paper's threshold rule")
    handles.append(plt.Line2D([], [], ls="", marker="$t$", color="k", ms=6))
    labels.append("label: tolerance t")
    figure.legend(handles, labels, fontsize=7, loc="upper right")
    figure.tight_layout(rect=(0, 0, 1 - 2.0 / (5.5 * count + 2.2), 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


_TEXT_COLUMNS = {"recipe", "setting", "policy", "strides"}


def read_csv(path: Path) -> list[dict]:
    """The rows of a ``speedup.csv``, numbers and yes/no read back as ``float``/``int`` and ``bool``."""

    def value(column: str, text: str) -> Any:
        if column in _TEXT_COLUMNS:
            return text
        if text in ("True", "False"):
            return text == "True"
        try:
            return int(text)
        except ValueError:
            return float(text)

    with path.open(newline="") as file:
        return [{c: value(c, t) for c, t in r.items()} for r in csv.DictReader(file)]


def replot(folder: Path) -> list[dict]:
    """``speedup.png`` and, where the table has ``tolerance=t`` rows, ``frontier.png`` again from
    ``folder/speedup.csv`` (after a change of the plots, without running anything)."""
    rows = read_csv(folder / "speedup.csv")
    plot(rows, folder / "speedup.png")
    if any(r["policy"].startswith(TOLERANCE) for r in rows):
        frontier_plot(rows, folder / "frontier.png")
    return rows


def table_columns(args: argparse.Namespace) -> tuple[str, ...]:
    """The columns of the run's tables: the wall-clock mode's, the frontier's (``--tolerances``) or the default."""
    if args.wall_clock:
        return WALL_COLUMNS
    return FRONTIER_COLUMNS if args.tolerances else COLUMNS


def algorithmic(args: argparse.Namespace) -> list[dict]:
    """The algorithmic mode: every recipe in a worker of its own (``--jobs`` at a time)."""
    job = {k: getattr(args, k) for k in ("out", "size", "steps", "windows", "harder_windows", "policies")}
    job["out"] = str(args.out)
    job["policies"] = list(dict.fromkeys([*args.policies, *map(tolerance_policy, args.tolerances)]))
    rows_by_recipe: dict[str, list[dict]] = {}
    if args.jobs == 1:
        rows_by_recipe = {name: measure_recipe(name, job) for name in args.recipes}
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {name: pool.submit(measure_recipe, name, job) for name in args.recipes}
            rows_by_recipe = {name: future.result() for name, future in futures.items()}
    rows = [r for name in args.recipes for r in rows_by_recipe[name]]
    columns = table_columns(args)
    write_csv(rows, columns, args.out / "speedup.csv")
    (args.out / "speedup.md").write_text(markdown(rows, columns) + "\n")
    plot(rows, args.out / "speedup.png")
    if args.tolerances:
        frontier_plot(rows, args.out / "frontier.png")
    return rows


WALL_COLUMNS = (
    "recipe",
    "order",
    "T",
    "seq_fit_s",
    "picard_fit_s",
    "speedup_fit",
    "seq_wall_s",
    "picard_wall_s",
    "speedup_wall",
    "picard_rounds",
    "T/rounds",
    "load_before_seq",
    "load_before_picard",
)


def wall_clock(args: argparse.Namespace) -> list[dict]:
    """The wall-clock mode: sequential against 2 fork processes, one recipe after the other."""
    steps = [f"--trainer.max_steps={args.steps}", f"--data.init_args.num_steps={args.steps}"]
    steps += [f"--trainer.val_check_interval={args.steps}"]
    runs = {
        "sequential": [*steps, "--trainer.strategy=auto", "--trainer.devices=1"],
        "picard": [*steps, "--trainer.strategy=picard_fork", "--trainer.devices=2"],
    }
    rows = []
    for index, name in enumerate(args.recipes):
        config = RECIPES[name].config(args.size)
        order = ["sequential", "picard"] if index % 2 == 0 else ["picard", "sequential"]
        result: dict[str, Any] = {"recipe": name, "order": " then ".join(order), "T": args.steps}
        for which in order:
            run_dir = args.out / name / which
            result[f"load_before_{'seq' if which == 'sequential' else which}"] = os.getloadavg()[0]
            started = time.perf_counter()
            fit_runs(config, {which: (run_dir, runs[which])}, args.out / name / "logs")
            wall = time.perf_counter() - started
            info = json.loads((run_dir / "run.json").read_text())
            short = "seq" if which == "sequential" else which
            result[f"{short}_fit_s"], result[f"{short}_wall_s"] = info["fit_seconds"], wall
            if which == "picard":
                result["picard_rounds"] = info["rounds"]
                result["T/rounds"] = info["steps"] / info["rounds"]
        result["speedup_fit"] = result["seq_fit_s"] / result["picard_fit_s"]
        result["speedup_wall"] = result["seq_wall_s"] / result["picard_wall_s"]
        rows.append(result)
        print(json.dumps(result), flush=True)
    write_csv(rows, WALL_COLUMNS, args.out / "wall_clock.csv")
    (args.out / "wall_clock.md").write_text(markdown(rows, WALL_COLUMNS) + "\n")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--windows", nargs="+", type=int, default=[2, 4, 8, 16], help="Default is 2 4 8 16.")
    parser.add_argument(
        "--harder-windows",
        nargs="*",
        type=int,
        default=[8],
        help="windows of the harder setting. Default is 8.",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=(*POLICIES, EXACT),
        help="Default is defaults paper.",
    )
    parser.add_argument(
        "--tolerances",
        nargs="+",
        type=float,
        default=[],
        metavar="T",
        help="also run the policy tolerance=T for each T (the speed/fidelity frontier, frontier.png). "
        "Default is none.",
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps T of every run. Default is 100."
    )
    parser.add_argument(
        "--size",
        choices=("small", "demo", "smoke"),
        default="small",
        help="configs: demo, smoke, or small (demo for Gaussians, smoke for the others). Default is small.",
    )
    parser.add_argument("--jobs", type=int, default=1, help="recipes measured at once. Default is 1.")
    parser.add_argument("--wall-clock", action="store_true", help="sequential vs 2 CPU processes, timed")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="run nothing: redraw speedup.png (and frontier.png) from --out's speedup.csv",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/speedup"))
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.out)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    if any(not t >= 0 for t in args.tolerances):
        parser.error(f"--tolerances must be numbers >= 0 (0 = exact), got {args.tolerances}")
    if args.wall_clock and args.tolerances:
        parser.error("--tolerances sweeps the algorithmic mode; drop it or --wall-clock")
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"one thread per process, load average at the start {'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(header, flush=True)
    rows = wall_clock(args) if args.wall_clock else algorithmic(args)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    footer = (
        f"finished {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC, load average at the end {load}"
    )
    (args.out / "machine.txt").write_text(f"{header}\n{footer}\n")
    print(footer)
    print(markdown(rows, table_columns(args)))
    return rows


if __name__ == "__main__":
    main()
