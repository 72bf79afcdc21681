"""Novel-view quality of a recipe on the closed-form prior: sequential vs Picard, against its initialisation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_quality.py --config recipes/configs/demo/textmesh.yaml \
        --out /tmp/quality/textmesh
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_quality.py --config recipes/configs/demo/magic3d.yaml \
        --out /tmp/quality/magic3d
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_quality.py \
        --config recipes/configs/demo/prolificdreamer-chain.yaml --out /tmp/quality/prolificdreamer

Fits the config (a recipe or a stages file) sequentially (``--trainer.strategy=auto``) and with the config's Picard
strategy on ``--devices`` processes (one thread each, at the same time, through ``lightning-picard fit``), then
prints for every stage: the PSNR/SSIM and the silhouette IoU (``recipes.eval.silhouette_iou``, the shape alone: the
measure of a stage that renders normals, as ProlificDreamer's geometry stage) of the 8 held-out views
(``recipes.eval.novel_view_quality``) at the stage's initialisation (its own, or the conversion of the previous stage's result) and after the sequential and the
Picard fit, the steps, Picard's rounds and steps per round, and the fit seconds. ``--sequential-only`` skips Picard;
``--reuse`` measures the runs already finished in ``--out`` again instead of refitting them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from recipes.cli import CONFIG_NAME, RecipeCLI, run_config
from recipes.data.cameras import Cameras
from recipes.demo import fit_runs, load_run, render_chw
from recipes.eval import novel_view_quality, silhouette_iou
from recipes.stages import is_stages_file, read_stages
from recipes.system import TextTo3D


def render_alpha(model: TextTo3D, cameras: Cameras) -> Tensor:
    """The coverage ``[V, 1, H, W]`` of ``model``'s scene in evaluation mode."""
    model.eval()
    with torch.no_grad():
        return model.scene.render(cameras.to(model.device))["opacity"].permute(0, 3, 1, 2)


def initial_quality(run_dir: Path) -> tuple[float, float]:
    """PSNR and silhouette IoU of the stage of ``run_dir`` before its first step (after ``init_from`` if it has
    one)."""
    model = RecipeCLI(
        args=["-c", run_config(run_dir / CONFIG_NAME)], run=False, save_config_callback=None
    ).model
    model.start_from_previous_stage()
    model.scene.prepare_step(0)
    model.eval()
    quality = novel_view_quality(lambda c: render_chw(model, c))
    return quality.psnr, silhouette_iou(lambda c: render_alpha(model, c))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--sequential-only", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="measure runs already finished in --out, fit the others"
    )
    parser.add_argument("overrides", nargs="*", help="extra fit arguments (e.g. --trainer.max_steps=100)")
    args = parser.parse_args()
    runs = {"sequential": (args.out / "sequential", ["--trainer.strategy=auto", *args.overrides])}
    if not args.sequential_only:
        picard = [f"--trainer.devices={args.devices}", *args.overrides]
        runs["picard"] = (args.out / "picard", picard)
    stages = [s.name for s in read_stages(args.config)[1]] if is_stages_file(args.config) else [None]
    last = stages[-1] or ""
    finished = [name for name, (run_dir, _) in runs.items() if (run_dir / last / "run.json").is_file()]
    if args.reuse:  # a finished run of the same command is measured again, not refit
        to_fit = {name: run for name, run in runs.items() if name not in finished}
    else:
        to_fit = runs
    if to_fit:
        fit_runs(args.config, to_fit, args.out / "logs")
    rows = []
    for stage in stages:
        row: dict[str, object] = {"stage": stage or args.config.stem}
        for name, (run_dir, _) in runs.items():
            folder = run_dir / stage if stage else run_dir
            info = json.loads((folder / "run.json").read_text())
            model = load_run(folder)
            quality = novel_view_quality(lambda c, m=model: render_chw(m, c))
            if name == "sequential":
                row["init_psnr"], row["init_iou"] = initial_quality(folder)
                row["steps"] = info["steps"]
            row[f"{name}_psnr"], row[f"{name}_ssim"] = quality.psnr, quality.ssim
            row[f"{name}_iou"] = silhouette_iou(lambda c, m=model: render_alpha(m, c))
            row[f"{name}_rounds"], row[f"{name}_fit_seconds"] = info["rounds"], info["fit_seconds"]
        if "picard_rounds" in row:
            row["steps_per_round"] = row["steps"] / row["picard_rounds"]
        rows.append(row)
        print(json.dumps(row))
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
