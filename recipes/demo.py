"""``lightning-picard demo``: DreamGaussian distils the closed-form prior, sequentially and with Picard, side by side.

No downloads, CPU only. Every run is a real ``lightning-picard fit`` of ``recipes/configs/demo/dreamgaussian.yaml``
in its own run folder, with one thread per process so that wall times compare:

1. two sequential runs with different seeds (they run at the same time, one core each): the baseline and the
   seed-to-seed yardstick of the fidelity ratio;
2. Picard on 2 processes (one thread each), seed 0;
3. the photometric-fit bound: the same Gaussians, cameras and schedule fitted to ground-truth renders, and, at the
   same time, the fidelity floor: the seed-0 sequential run again with its initial Gaussians moved by a relative
   1e-7 (one or two float32 rounding steps). Its distance to the reference is what any inexactness costs on this
   problem — another thread count or GPU changes the sequential run's rounding as much — so Picard's fidelity
   ratio is read against it.

It prints one table and writes, into ``--out``: ``summary.json``, ``summary.md``, a side-by-side turntable GIF
(ground truth | sequential | Picard), a convergence plot (error, threshold and skip over τ) and the mesh.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recipes.data.cameras import Cameras, orbit_cameras
from recipes.data.procedural import default_procedural_object, held_out_cameras
from recipes.eval import novel_view_quality
from recipes.system.module import TextTo3D

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo" / "dreamgaussian.yaml"
SUMMARY_KEYS = (
    "steps",
    "rounds",
    "wall_seconds_sequential",
    "wall_seconds_picard",
    "sequential_psnr",
    "picard_psnr",
    "photometric_psnr",
    "fidelity_ratio",
    "fidelity_floor",
)
PERTURBATION = 1e-7
"""Relative change of the initial Gaussians' radius in the fidelity-floor run: about one float32 rounding step."""


class PhotometricFit(TextTo3D):
    """The photometric-fit bound: the same scene and cameras, fitted to ground-truth renders by MSE.

    It says what the representation, renderer and schedule can reach at all; the gap to it is what score
    distillation from the prior costs. Same arguments as :class:`~recipes.system.TextTo3D` (guidance unused).
    """

    def training_step(self, cameras: Cameras, batch_idx: int) -> Tensor:
        self.scene.prepare_step(self.global_step)
        rgb = self.scene.render(cameras)["comp_rgb"]
        with torch.no_grad():
            target = default_procedural_object().render(cameras).rgb.permute(0, 2, 3, 1).to(rgb)
        # SDS's surrogate scale in the prior's [-1, 1] space, 0.5·‖x − y‖²/B, so that the screen-space gradients
        # that drive densification are of the same order as in the SDS runs
        loss = 0.5 * (2 * (rgb - target)).square().sum() / rgb.shape[0]
        self.log("train/loss_photometric", loss.detach())
        return loss

    def on_fit_start(self) -> None:
        """No guidance to load."""


def fit_runs(
    config: Path, runs: dict[str, tuple[Path, list[str]] | tuple[Path, list[str], Path]], logs: Path
) -> None:
    """``lightning-picard fit -c config --run_dir RUN OVERRIDES…`` for every ``name: (RUN, OVERRIDES)`` at once, one
    thread per process, each logging to ``logs/<name>.log``; raise with the log's tail if one fails.

    A run given as ``(RUN, OVERRIDES, CONFIG)`` uses its own config file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LIGHTNING_PICARD_RUN_DIR", None)
    logs.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name, (run_dir, overrides, *own) in runs.items():
        run_config = own[0] if own else config
        command = [
            sys.executable,
            "-m",
            "recipes.cli",
            "fit",
            "-c",
            str(run_config),
            "--run_dir",
            str(run_dir),
        ]
        log = logs / f"{name}.log"
        with log.open("w") as file:
            processes[name] = subprocess.Popen(
                [*command, *overrides], stdout=file, stderr=subprocess.STDOUT, env=env
            )
    for name, process in processes.items():
        if process.wait() != 0:
            log = logs / f"{name}.log"
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"the {name} run failed (log: {log}):\n{tail}")


def load_run(run_dir: Path) -> TextTo3D:
    """The trained module of ``run_dir`` (its last checkpoint), built from the run's saved config like the CLI."""
    from recipes.cli import CONFIG_NAME, RecipeCLI, load_checkpoint, run_config

    model = RecipeCLI(
        args=["-c", run_config(run_dir / CONFIG_NAME)], run=False, save_config_callback=None
    ).model
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"])
    return model.eval()


def render_chw(model: TextTo3D, cameras: Cameras) -> Tensor:
    """:meth:`TextTo3D.render_views` as ``[V, 3, H, W]``, the layout of the quality measures."""
    return model.render_views(cameras).permute(0, 3, 1, 2)


PHOTOMETRIC_GRAD_THRESHOLD = 2.0
"""Densification threshold of the photometric fit: its screen-space gradients are about twice SDS's on the
prior (at SDS's 1.0 it grows to ~950 Gaussians; benchmarks/demo_quality.py)."""


def perturbed_initialisation(config: Path) -> list[str] | None:
    """Overrides that scale the initial Gaussians' radius by ``1 + PERTURBATION``, or None if ``config`` has no
    ``scene.init_args.init.radius`` (then the demo reports no fidelity floor)."""
    import yaml

    scene = yaml.safe_load(config.read_text())["model"]["init_args"]["scene"]
    radius = scene.get("init_args", {}).get("init", {}).get("radius")
    if radius is None:
        return None
    return ["--model.init_args.scene.init_args.init.radius", repr(float(radius) * (1 + PERTURBATION))]


def photometric_config(config: Path, out: Path) -> Path:
    """``config`` with the model class swapped for :class:`PhotometricFit` (same arguments) and the
    densification threshold set to :data:`PHOTOMETRIC_GRAD_THRESHOLD`."""
    import yaml

    data = yaml.safe_load(config.read_text())
    data["model"]["class_path"] = f"{__name__}.PhotometricFit"
    scene = data["model"]["init_args"]["scene"].get("init_args", {})
    if "densification" in scene:
        scene["densification"]["grad_threshold"] = PHOTOMETRIC_GRAD_THRESHOLD
    path = out / "photometric.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _metrics(run_dir: Path) -> dict[str, list[float]]:
    """Columns of the run's metrics.csv that hold Picard metrics, against ``step``."""
    path = run_dir / "metrics.csv"
    series: dict[str, list[float]] = {}
    if not path.exists():
        return series
    with path.open() as file:
        for row in csv.DictReader(file):
            if not row.get("picard/skip"):
                continue
            for key, value in row.items():
                if key == "step" or key.startswith("picard/"):
                    series.setdefault(key, []).append(float(value) if value else math.nan)
    return series


def convergence_plot(series: dict[str, list[float]], path: Path) -> Path | None:
    """Error (median, max), threshold and skip over τ, as a PNG."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = series["step"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.semilogy(tau, series["picard/error_median"], label="error (median over the window)")
    top.semilogy(tau, series["picard/error_max"], label="error (max)", alpha=0.6)
    top.semilogy(tau, series["picard/threshold"], "k--", label="threshold e")
    top.set_ylabel("‖θ′ − θ‖² / D")
    top.legend(fontsize=8)
    bottom.step(tau, series["picard/skip"], where="post")
    bottom.set_ylabel("steps accepted")
    bottom.set_xlabel("τ (converged steps)")
    figure.suptitle("Picard convergence")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def side_by_side_gif(columns: list[Tensor], path: Path, scale: int = 4) -> Path:
    """Frames ``[N, 3, H, W]`` of each column next to each other, enlarged ``scale`` times, as a GIF."""
    from recipes.export.video import write_video

    frames = torch.cat([c.clamp(0, 1) for c in columns], dim=-1)
    frames = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="nearest")
    return write_video(path, frames.permute(0, 2, 3, 1), fps=12)


def measure(runs: dict[str, Path]) -> dict[str, Any]:
    """Quality, fidelity and cost of the demo's runs."""
    models = {name: load_run(run) for name, run in runs.items()}
    quality = {
        name: novel_view_quality(lambda c, m=model: render_chw(m, c)) for name, model in models.items()
    }
    held_out = held_out_cameras()
    renders = {name: render_chw(model, held_out) for name, model in models.items()}
    picard_distance = (renders["picard"] - renders["sequential"]).square().mean().item()
    seed_distance = (renders["sequential_seed1"] - renders["sequential"]).square().mean().item()
    floor_distance = (
        (renders["perturbed"] - renders["sequential"]).square().mean().item()
        if "perturbed" in renders
        else math.nan
    )
    info = {name: json.loads((run / "run.json").read_text()) for name, run in runs.items()}
    steps = info["sequential"]["steps"]
    rounds = info["picard"]["rounds"]
    return {
        "steps": steps,
        "rounds": rounds,
        "steps_per_round": steps / rounds if rounds else math.nan,
        "wall_seconds_sequential": info["sequential"]["fit_seconds"],
        "wall_seconds_picard": info["picard"]["fit_seconds"],
        "speedup": info["sequential"]["fit_seconds"] / info["picard"]["fit_seconds"],
        "sequential_psnr": quality["sequential"].psnr,
        "sequential_ssim": quality["sequential"].ssim,
        "sequential_seed1_psnr": quality["sequential_seed1"].psnr,
        "picard_psnr": quality["picard"].psnr,
        "picard_ssim": quality["picard"].ssim,
        "photometric_psnr": quality["photometric"].psnr,
        "photometric_ssim": quality["photometric"].ssim,
        "picard_render_distance": picard_distance,
        "seed_render_distance": seed_distance,
        "fidelity_ratio": picard_distance / seed_distance if seed_distance > 0 else math.nan,
        "perturbed_render_distance": floor_distance,
        "fidelity_floor": floor_distance / seed_distance if seed_distance > 0 else math.nan,
        "gaussians": {name: len(model.scene.gaussians) for name, model in models.items()},
        "_models": models,
    }


def table(summary: dict[str, Any]) -> str:
    """The demo's result as a Markdown table."""
    rows = [
        ("steps", f"{summary['steps']}"),
        ("Picard rounds (T / rounds)", f"{summary['rounds']:.0f} ({summary['steps_per_round']:.2f} steps per round)"),
        ("wall time sequential / Picard", f"{summary['wall_seconds_sequential']:.1f} s / {summary['wall_seconds_picard']:.1f} s"),
        ("speedup", f"{summary['speedup']:.2f}x"),
        ("novel-view PSNR / SSIM, sequential", f"{summary['sequential_psnr']:.2f} dB / {summary['sequential_ssim']:.3f}"),
        ("novel-view PSNR / SSIM, Picard", f"{summary['picard_psnr']:.2f} dB / {summary['picard_ssim']:.3f}"),
        ("novel-view PSNR, sequential with another seed", f"{summary['sequential_seed1_psnr']:.2f} dB"),
        ("photometric-fit bound (same setup)", f"{summary['photometric_psnr']:.2f} dB / {summary['photometric_ssim']:.3f}"),
        (
            "fidelity ratio (Picard↔sequential / seed↔seed)",
            f"{100 * summary['fidelity_ratio']:.2f}% ({summary['picard_render_distance']:.2e} / "
            f"{summary['seed_render_distance']:.2e})",
        ),
        (
            f"fidelity floor (sequential, initial positions ×(1+{PERTURBATION:g}))",
            f"{100 * summary['fidelity_floor']:.2f}% ({summary['perturbed_render_distance']:.2e} / "
            f"{summary['seed_render_distance']:.2e})",
        ),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'':<{width}} | result |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def run(
    out: Path, config: Path = DEMO_CONFIG, overrides: list[str] | None = None, devices: int = 2
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary (also written as ``summary.json``)."""
    overrides = list(overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    names = ("sequential", "sequential_seed1", "picard", "photometric", "perturbed")
    runs = {name: out / "runs" / name for name in names}
    for run_dir in runs.values():
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"{out} already holds a demo; pass another --out")
    sequential = ["--trainer.strategy", "auto", "--trainer.devices", "1"]
    seed1 = ["--model.seed", "1", "--data.init_args.seed", "1"]
    picard = ["--trainer.devices", str(devices)]  # the config's strategy
    started = time.perf_counter()

    def launch(names_and_args: dict[str, list[str]], run_config: Path = config) -> None:
        fit_runs(
            run_config,
            {name: (runs[name], [*overrides, *a]) for name, a in names_and_args.items()},
            out / "logs",
        )

    print(
        f"[1/3] two sequential runs (seeds 0 and 1), one core each … ({time.perf_counter() - started:.0f} s)"
    )
    launch({"sequential": sequential, "sequential_seed1": [*sequential, *seed1]})
    print(f"[2/3] Picard on {devices} processes … ({time.perf_counter() - started:.0f} s)")
    launch({"picard": picard})
    print(f"[3/3] photometric-fit bound and fidelity floor … ({time.perf_counter() - started:.0f} s)")
    last = {"photometric": (runs["photometric"], [*overrides, *sequential], photometric_config(config, out))}
    perturbed = perturbed_initialisation(config)
    if perturbed is None:
        del runs["perturbed"]
    else:
        last["perturbed"] = (runs["perturbed"], [*overrides, *sequential, *perturbed])
    fit_runs(config, last, out / "logs")

    summary = measure(runs)
    models = summary.pop("_models")
    turntable = orbit_cameras(36, elevation_deg=20.0, distance=3.0, fovy_deg=40.0, height=32, width=32)
    ground_truth = default_procedural_object().render(turntable).rgb
    gif = side_by_side_gif(
        [ground_truth, render_chw(models["sequential"], turntable), render_chw(models["picard"], turntable)],
        out / "turntable_gt_sequential_picard.gif",
    )
    plot = convergence_plot(_metrics(runs["picard"]), out / "convergence.png")
    mesh = models["picard"].scene.export_mesh(
        out / "mesh", models["picard"].mesh_resolution, models["picard"].texture_size
    )
    summary["files"] = {"turntable": str(gif), "convergence": str(plot), "mesh": [str(p) for p in mesh]}
    summary["total_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table(summary) + "\n")
    print("\n" + table(summary))
    print(
        f"\nWrote {out}/summary.json, {gif.name}, convergence.png and the mesh in {summary['total_seconds']:.0f} s."
    )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="lightning-picard demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/demo/<time>)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="the recipe config to run")
    parser.add_argument("--devices", type=int, default=2, help="Picard processes (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    args, overrides = parser.parse_known_args(argv)
    if args.steps is not None:
        steps = str(args.steps)
        overrides += ["--trainer.max_steps", steps, "--trainer.val_check_interval", steps]
        overrides += ["--data.init_args.num_steps", steps]
    out = args.out or Path("outputs") / "demo" / time.strftime("%Y%m%d-%H%M%S")
    return run(out, args.config, overrides, args.devices)


__all__ = ["SUMMARY_KEYS", "PhotometricFit", "main", "run"]
