"""Amortized text-to-3D on the weight-free K-object setting: sequential vs Picard, per object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortized_quality.py --out /tmp/amortized_quality

Fits ``recipes/configs/demo/amortized.yaml`` (one Hyper-iNGP over K captioned procedural objects, ASD on each
object's closed-form prior) three times through ``lightning-picard fit``, one thread per process: sequentially with
seed 0 and with seed 1 (``--trainer.strategy=auto``, the two at once), then with the config's Picard strategy on
``--devices`` processes. Prints, for each object, the novel-view PSNR of the 8 held-out views
(``recipes.eval.novel_view_quality`` against that object's ground truth) for the sequential and the Picard run; the
steps, Picard's rounds (T/rounds) and fit seconds (and the PSNR at the initialisation, the sphere every prompt starts as); and the fidelity ratio: the distance of Picard's final parameters
to the sequential run's over the distance between the two sequential seeds (0: the sequential run itself; 1: as far
as another seed). ``--reuse`` measures the runs already in ``--out`` (and fits only what is missing); ``--threshold`` runs Picard at
another threshold than the config's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recipes import demo
from recipes.cli import CONFIG_NAME, RecipeCLI, run_config
from recipes.data.procedural import held_out_cameras
from recipes.data.procedural_set import object_of_caption
from recipes.eval import novel_view_quality
from recipes.system.amortized import AmortizedTextTo3D

STRATEGY = "lightning_picard.PicardStrategy"
CONFIG = Path(__file__).parents[1] / "recipes" / "configs" / "demo" / "amortized.yaml"


def fit_all(
    config: Path, out: Path, devices: int, reuse: bool, threshold: str | None, tolerance: str | None
) -> dict[str, Path]:
    """The three runs' folders (fitted unless ``reuse`` and present). ``threshold`` replaces the config's Picard
    threshold (run folder ``picard_threshold_<value>``); ``tolerance`` uses the step-relative rule at that tolerance
    instead, window 7 (``picard_tolerance_<value>``)."""
    picard = "picard" if threshold is None else f"picard_threshold_{threshold}"
    picard = picard if tolerance is None else f"picard_tolerance_{tolerance}"
    runs = {"sequential": out / "sequential", "seed1": out / "seed1", "picard": out / picard}
    cache = ["--model.corpus.cache_dir", str(out / "cache")]
    sequential = ["--trainer.strategy", "auto", "--trainer.devices", "1", *cache]
    pending = {
        "sequential": sequential,
        "seed1": [*sequential, "--model.seed", "1", "--data.init_args.seed", "1"],
    }
    pending = {n: a for n, a in pending.items() if not (reuse and (runs[n] / "run.json").exists())}
    if pending:
        demo.fit_runs(config, {n: (runs[n], a) for n, a in pending.items()}, out)
    if not (reuse and (runs["picard"] / "run.json").exists()):
        extra = [] if threshold is None else ["--trainer.strategy.init_args.threshold", threshold]
        if tolerance is not None:
            rule = {"window_size": 7, "tolerance": float(tolerance), "threshold": None, "ema_decay": None}
            extra = ["--trainer.strategy", json.dumps({"class_path": STRATEGY, "init_args": rule})]
        picard_args = ["--trainer.devices", str(devices), *cache, *extra]
        demo.fit_runs(config, {runs["picard"].name: (runs["picard"], picard_args)}, out)
    return runs


def parameters(model: AmortizedTextTo3D) -> torch.Tensor:
    """The generator's and background's trained parameters as one vector."""
    return torch.cat([p.detach().flatten() for p in model.scene.parameters() if p.requires_grad])


def initial_model(run_dir: Path) -> AmortizedTextTo3D:
    """The module of ``run_dir`` before its first step (built from the run's config, no checkpoint)."""
    model = RecipeCLI(
        args=["-c", run_config(run_dir / CONFIG_NAME)], run=False, save_config_callback=None
    ).model
    model.scene.prepare_step(0)
    return model.eval()


def measure(runs: dict[str, Path]) -> dict[str, object]:
    models = {name: demo.load_run(run) for name, run in runs.items()}
    models["init"] = initial_model(runs["sequential"])
    first = models["sequential"]
    height = first.guidance_config.closed_form.height
    cameras = held_out_cameras(height=height, width=height)
    per_object = []
    for index, caption in enumerate(first.corpus.train):
        truth = object_of_caption(caption).object
        row: dict[str, object] = {"object": caption}
        for name in ("init", "sequential", "picard"):
            model = models[name]

            def render(c, m=model, p=caption, i=index):
                return m.render_prompt(p, i, c).permute(0, 3, 1, 2)

            row[name] = novel_view_quality(render, cameras, truth).psnr
        per_object.append(row)
    theta = {name: parameters(models[name]) for name in runs}
    seed_distance = (theta["seed1"] - theta["sequential"]).norm().item()
    info = {name: json.loads((run / "run.json").read_text()) for name, run in runs.items()}
    return {
        "objects": per_object,
        "steps": info["picard"]["steps"],
        "rounds": info["picard"]["rounds"],
        "fit_seconds": {name: i["fit_seconds"] for name, i in info.items()},
        "picard_distance": (theta["picard"] - theta["sequential"]).norm().item(),
        "seed_distance": seed_distance,
        "fidelity_ratio": (theta["picard"] - theta["sequential"]).norm().item() / seed_distance,
    }


def table(summary: dict[str, object]) -> str:
    lines = ["| object | init PSNR (dB) | sequential PSNR (dB) | Picard PSNR (dB) |", "|---|---|---|---|"]
    for row in summary["objects"]:
        lines.append(
            f"| {row['object']} | {row['init']:.2f} | {row['sequential']:.2f} | {row['picard']:.2f} |"
        )
    mean = {
        k: sum(r[k] for r in summary["objects"]) / len(summary["objects"])
        for k in ("init", "sequential", "picard")
    }
    lines.append(
        f"| **mean** | **{mean['init']:.2f}** | **{mean['sequential']:.2f}** | **{mean['picard']:.2f}** |"
    )
    seconds = summary["fit_seconds"]
    lines += [
        "",
        f"T = {summary['steps']} steps, Picard rounds = {summary['rounds']} "
        f"(T/rounds = {summary['steps'] / summary['rounds']:.2f}); fit seconds: sequential "
        f"{seconds['sequential']:.0f}, Picard {seconds['picard']:.0f}.",
        f"Fidelity ratio = ‖θ_Picard − θ_seq‖ / ‖θ_seed1 − θ_seq‖ = {summary['picard_distance']:.4g} / "
        f"{summary['seed_distance']:.4g} = {100 * summary['fidelity_ratio']:.2f}%.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("outputs/amortized_quality"))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--threshold", default=None, help="Picard threshold instead of the config's")
    parser.add_argument("--tolerance", default=None, help="the step-relative rule at this tolerance instead")
    args = parser.parse_args()
    runs = fit_all(args.config, args.out, args.devices, args.reuse, args.threshold, args.tolerance)
    summary = measure(runs)
    (args.out / f"summary_{runs['picard'].name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
