"""``lightning-picard eval RUN_DIR… --clip MODEL [--reference-images FOLDER] [--out PREFIX]``.

Measures CLIP R-Precision (recall@1 over the prompts of the runs given), CLIP similarity (each frame's cosine with its
own prompt) and, with reference images, CLIP-FID on each run's
turntable (``RUN/test/turntable-step*.mp4``, written by ``lightning-picard test`` or at the end of ``fit``), and
writes ``PREFIX.csv`` and ``PREFIX.md`` (default ``PREFIX``: ``quality`` in the current folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import Tensor

from recipes.eval.clip_quality import (
    clip_fid,
    clip_similarity,
    fmt,
    load_clip,
    r_precision,
    read_images,
    read_video,
)

COLUMNS = ("run", "prompt", "step", "frames", "clip_r_precision", "clip_similarity", "clip_fid")


@dataclass
class EvaluatedRun:
    """A run folder's prompt and its latest turntable."""

    run_dir: Path
    prompt: str
    step: int
    video: Path


def find_run(run_dir: str | Path) -> EvaluatedRun:
    """The prompt (``run.json`` or ``config.yaml``) and latest turntable of a run folder; ``FileNotFoundError``
    with what to run when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    prompt = _prompt(run_dir)
    videos = sorted((run_dir / "test").glob("turntable-step*.mp4"), key=_step)
    if not videos:
        raise FileNotFoundError(
            f"{run_dir} has no turntable (test/turntable-step*.mp4); render it first with "
            f"`lightning-picard test --ckpt_path {run_dir / 'checkpoints' / 'last.ckpt'}`"
        )
    return EvaluatedRun(run_dir, prompt, _step(videos[-1]), videos[-1])


def _step(path: Path) -> int:
    match = re.search(r"step(\d+)", path.stem)
    return int(match.group(1)) if match else -1


def _prompt(run_dir: Path) -> str:
    info = run_dir / "run.json"
    if info.exists():
        prompt = json.loads(info.read_text()).get("prompt")
        if prompt:
            return str(prompt)
    config = run_dir / "config.yaml"
    if config.exists():
        prompt = (
            (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("init_args", {}).get("prompt")
        )
        if prompt:
            return str(prompt)
    raise FileNotFoundError(f"{run_dir} has neither run.json nor config.yaml with a prompt: not a run folder")


def evaluate(
    run_dirs: list[str | Path], clip: str, reference_images: str | Path | None = None
) -> list[dict[str, object]]:
    """One row per run (columns :data:`COLUMNS`) and a last row ``all`` (mean R-Precision and similarity, FID of all
    frames)."""
    runs = [find_run(d) for d in run_dirs]  # every input checked before the model is loaded
    reference = read_images(reference_images) if reference_images is not None else None
    model = load_clip(clip)
    frames: list[Tensor] = [read_video(run.video) for run in runs]
    prompts = [run.prompt for run in runs]
    text = model.text_embeddings(list(dict.fromkeys(prompts)))
    embeddings = [model.image_embeddings(f) for f in frames]
    precision = r_precision(embeddings, prompts, text)
    similarity = clip_similarity(embeddings, prompts, text)
    rows: list[dict[str, object]] = []
    for run, run_frames, value, cosine in zip(runs, frames, precision, similarity, strict=True):
        fid = clip_fid(model.features, reference, run_frames) if reference is not None else math.nan
        rows.append(
            {
                "run": str(run.run_dir),
                "prompt": run.prompt,
                "step": run.step,
                "frames": len(run_frames),
                "clip_r_precision": value,
                "clip_similarity": cosine,
                "clip_fid": fid,
            }
        )
    if len(runs) > 1:
        import torch

        everything = torch.cat(frames)
        total = sum(len(f) for f in frames)
        rows.append(
            {
                "run": "all",
                "prompt": f"{len(dict.fromkeys(prompts))} prompts",
                "step": "",
                "frames": total,
                "clip_r_precision": sum(p * len(f) for p, f in zip(precision, frames, strict=True)) / total,
                "clip_similarity": sum(c * len(f) for c, f in zip(similarity, frames, strict=True)) / total,
                "clip_fid": clip_fid(model.features, reference, everything)
                if reference is not None
                else math.nan,
            }
        )
    return rows


def write_table(rows: list[dict[str, object]], prefix: str | Path, clip: str) -> tuple[Path, Path]:
    """``PREFIX.csv`` and ``PREFIX.md`` (numbers to 4 decimals, empty where not measured)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = prefix.with_suffix(".csv"), prefix.with_suffix(".md")
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(v) if isinstance(v, float) else v for k, v in row.items()})
    lines = [
        f"CLIP: `{clip}`; R-Precision top-1 (recall@1) over the prompts of these runs; CLIP similarity: the mean "
        "cosine of each frame with its own prompt; CLIP-FID against the reference images.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [fmt(v) if isinstance(v, float) else str(v).replace("|", "\\|") for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str]) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="lightning-picard eval", description="CLIP R-Precision and CLIP-FID of runs' turntables."
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders with a turntable (lightning-picard test)")
    parser.add_argument(
        "--clip", required=True, help="CLIP model: a local folder or a Hugging Face id in the cache"
    )
    parser.add_argument("--reference-images", default=None, help="folder of reference images for CLIP-FID")
    parser.add_argument("--out", default="quality", help="output prefix: PREFIX.csv and PREFIX.md")
    args = parser.parse_args(argv)
    rows = evaluate(args.run_dirs, args.clip, args.reference_images)
    csv_path, md_path = write_table(rows, args.out, args.clip)
    print(md_path.read_text(), end="")
    print(f"Wrote {csv_path} and {md_path}", file=sys.stderr)
    return rows
