"""Zero-1-to-3 on the closed-form prior: novel-view quality of the sequential and the Picard run, and the rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero123_quality.py --out /tmp/zero123_quality
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero123_quality.py --configs recipes/configs/demo/zero123-nerf.yaml \
        --steps 200 --out /tmp/zq

For each config (default: ``recipes/configs/demo/zero123-{gaussians,nerf}.yaml``) it runs ``lightning-picard fit``
three times, side by side, one thread per process: sequentially (``--trainer.strategy=auto``), with the config's
Picard strategy on 2 CPU processes, and sequentially with seed 1 (``--model.seed=1 --data.seed=1``). It then
measures ``novel_view_quality`` (the procedural object's 8 held-out views, 32 × 32, none a training pose nor the
input view) of the initial scene and of each run's last checkpoint, and prints one markdown row per config:
PSNR/SSIM at initialisation, sequential and Picard, the seed-1 PSNR, the fidelity ratio (mean squared difference
of the held-out renders, Picard to sequential over seed 1 to sequential), the steps, the Picard rounds and
T/rounds. ``--evaluate-only`` measures the run folders already in ``--out``. The runs are deterministic (per-step seeds), so the PSNR and the rounds do not depend on the
load of the machine; only the wall times do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recipes.cli import RecipeCLI
from recipes.data.procedural import held_out_cameras
from recipes.demo import fit_runs, load_run, render_chw
from recipes.eval import novel_view_quality

CONFIGS = Path(__file__).parents[1] / "recipes" / "configs" / "demo"
DEFAULT_CONFIGS = [CONFIGS / "zero123-gaussians.yaml", CONFIGS / "zero123-nerf.yaml"]


def quality(model: torch.nn.Module) -> tuple[float, float]:
    """Mean novel-view (PSNR, SSIM) of ``model`` on the held-out views."""
    result = novel_view_quality(lambda cameras: render_chw(model, cameras))
    return result.psnr, result.ssim


def initial_quality(config: Path, overrides: list[str]) -> tuple[float, float]:
    """Quality of the scene the config starts from (before any step)."""
    model = RecipeCLI(args=["-c", str(config), *overrides], run=False, save_config_callback=None).model
    return quality(model.eval())


def measure(config: Path, out: Path, steps: int | None, fit: bool = True) -> dict[str, float]:
    overrides = (
        [] if steps is None else [f"--trainer.{k}={steps}" for k in ("max_steps", "val_check_interval")]
    )
    overrides += [] if steps is None else [f"--data.num_steps={steps}"]
    runs = {
        "sequential": (out / "sequential", ["--trainer.strategy=auto", *overrides]),
        "picard": (out / "picard", ["--trainer.devices=2", *overrides]),
        "seed1": (out / "seed1", ["--trainer.strategy=auto", "--model.seed=1", "--data.seed=1", *overrides]),
    }
    if fit:
        fit_runs(config, runs, out / "logs")
    row: dict[str, float] = {}
    row["init_psnr"], row["init_ssim"] = initial_quality(config, overrides)
    renders = {}
    for name, (run_dir, _) in runs.items():
        info = json.loads((run_dir / "run.json").read_text())
        model = load_run(run_dir)
        row[f"{name}_psnr"], row[f"{name}_ssim"] = quality(model)
        renders[name] = render_chw(model, held_out_cameras())
        row[f"{name}_fit_s"] = info["fit_seconds"]
        row["steps"], row[f"{name}_rounds"] = info["steps"], info["rounds"]
    seed_distance = (renders["seed1"] - renders["sequential"]).square().mean().item()
    row["fidelity"] = (renders["picard"] - renders["sequential"]).square().mean().item() / seed_distance
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--steps", type=int, default=None, help="override the configs' step count")
    parser.add_argument("--out", type=Path, required=True, help="folder for the run folders and logs")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="measure the run folders already in --out"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| config | steps | init PSNR / SSIM | sequential PSNR / SSIM | Picard PSNR / SSIM | sequential seed 1 PSNR "
        "| fidelity ratio | rounds | T/rounds | fit s seq / Picard |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in args.configs:
        row = measure(config, args.out / config.stem, args.steps, fit=not args.evaluate_only)
        print(
            f"| `{config.stem}` | {row['steps']:.0f} | {row['init_psnr']:.2f} / {row['init_ssim']:.3f} "
            f"| {row['sequential_psnr']:.2f} / {row['sequential_ssim']:.3f} "
            f"| {row['picard_psnr']:.2f} / {row['picard_ssim']:.3f} | {row['seed1_psnr']:.2f} "
            f"| {100 * row['fidelity']:.1f}% | {row['picard_rounds']:.0f} | {row['steps'] / row['picard_rounds']:.2f} "
            f"| {row['sequential_fit_s']:.1f} / {row['picard_fit_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
