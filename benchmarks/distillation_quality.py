"""Does a recipe learn the object? Sequential and Picard runs of a CPU-size config on the closed-form prior.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distillation_quality.py --recipes asd prolificdreamer
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distillation_quality.py --recipes prolificdreamer \
        --variant replayed=--model.distillation.particle.placement=replayed

For each ``recipes/configs/demo/<recipe>.yaml`` it fits the sequential run (``--trainer.strategy=auto``) and the
Picard run (the config's strategy on ``--devices`` processes), one thread per process, through the
``lightning-picard`` command line, then measures the novel-view PSNR/SSIM against the procedural object's ground
truth (``recipes.eval.novel_view_quality``: the 8 held-out views) of the initialisation (the module as the config
builds it), of both runs' last checkpoints, and reads the steps, rounds and fit seconds from ``run.json``. A
``--variant NAME=OVERRIDE[,OVERRIDE…]`` adds a Picard run with extra overrides (e.g. the replayed particle). It
prints a Markdown table and writes ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from lightning_picard.hooks import local_parameters, picard_parameters
from recipes.cli import RecipeCLI
from recipes.demo import fit_runs, load_run, render_chw
from recipes.eval import novel_view_quality

CONFIGS = Path(__file__).parents[1] / "recipes" / "configs" / "demo"


def initial_quality(config: Path) -> float:
    """Novel-view PSNR of the module as ``config`` builds it, before any step."""
    model = RecipeCLI(args=["-c", str(config)], run=False, save_config_callback=None).model.eval()
    return novel_view_quality(lambda cameras: render_chw(model, cameras)).psnr


def measure(
    recipe: str, out: Path, devices: int, steps: int | None, variants: dict[str, list[str]]
) -> list[dict]:
    config = CONFIGS / f"{recipe}.yaml"
    common = [] if steps is None else [f"--trainer.max_steps={steps}", f"--data.num_steps={steps}"]
    runs = {
        "sequential": (out / recipe / "sequential", [*common, "--trainer.strategy=auto"]),
        "picard": (out / recipe / "picard", [*common, f"--trainer.devices={devices}"]),
    }
    for name, overrides in variants.items():
        runs[f"picard-{name}"] = (
            out / recipe / f"picard-{name}",
            [*common, f"--trainer.devices={devices}", *overrides],
        )
        runs[f"sequential-{name}"] = (
            out / recipe / f"sequential-{name}",
            [*common, "--trainer.strategy=auto", *overrides],
        )
    fit_runs(config, runs, out / recipe / "logs")
    init_psnr = initial_quality(config)
    rows = []
    for name, (run_dir, _) in runs.items():
        model = load_run(run_dir)
        quality = novel_view_quality(lambda cameras, m=model: render_chw(m, cameras))
        info = json.loads((run_dir / "run.json").read_text())
        rows.append(
            {
                "recipe": recipe,
                "run": name,
                "init_psnr": init_psnr,
                "psnr": quality.psnr,
                "ssim": quality.ssim,
                "steps": info["steps"],
                "rounds": info["rounds"],
                "steps_per_round": info["steps"] / info["rounds"] if info["rounds"] else math.nan,
                "fit_seconds": info["fit_seconds"],
                "picard_state": sum(p.numel() for p in picard_parameters(model)),
                "rank_local": sum(p.numel() for p in local_parameters(model)),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | run | init PSNR (dB) | PSNR (dB) | SSIM | steps T | rounds | T/rounds | fit s | s/round "
        "| Picard state D | rank-local |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['run']} | {r['init_psnr']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['steps']} | "
            f"{r['rounds']} | {r['steps_per_round']:.2f} | {r['fit_seconds']:.0f} | "
            f"{r['fit_seconds'] / r['rounds']:.2f} | {r['picard_state']:,} | {r['rank_local']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=["asd", "prolificdreamer"])
    parser.add_argument("--devices", type=int, default=2, help="Picard processes. Default is 2.")
    parser.add_argument("--steps", type=int, default=None, help="override the config's step count")
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE[,OVERRIDE...]")
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe_quality"))
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = overrides.split(",")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [
        row
        for recipe in args.recipes
        for row in measure(recipe, args.out, args.devices, args.steps, variants)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"started": started, "rows": rows}, indent=2) + "\n")
    print(f"started {started}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
