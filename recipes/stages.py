"""Multi-stage recipes (Magic3D: NeRF coarse → DMTet refine) as one ``lightning-picard fit`` command.

A stages file is a config whose top level lists the stage configs instead of a model::

    recipe: magic3d
    stages:
      - {name: coarse, config: magic3d-coarse.yaml}
      - {name: refine, config: magic3d-refine.yaml, init_from: coarse}

``lightning-picard fit -c recipes/configs/magic3d.yaml [--run_dir RUN] [OVERRIDES…]`` runs the stages in order, each
as its own ``lightning-picard fit`` process (so every launcher, ``popen`` included, starts its ranks from that
stage's command), into one run folder::

    RUN/stages.yaml       the stages and overrides of the chain
    RUN/coarse/           a complete run folder (config.yaml, checkpoints/last.ckpt, val/, run.json, …)
    RUN/refine/           started from RUN/coarse through --model.init_from

``RUN`` is ``--run_dir`` or ``<trainer.default_root_dir or outputs>/<recipe>/<prompt>@<time>``. Overrides apply to
every stage (``--model.prompt "…"``, ``--trainer.strategy=auto``), except those prefixed with a stage's name, which
apply to that stage only (``--refine.trainer.max_steps=100``). Config paths are relative to the stages file. A
stage whose folder holds a finished run (``run.json``) is skipped, so the same command continues a chain that
stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STAGES_FILE = "stages.yaml"


@dataclass
class Stage:
    """One stage: its folder name, its config and the stage it starts from (None: its own initialisation)."""

    name: str
    config: Path
    init_from: str | None = None


def read_stages(path: Path) -> tuple[str, list[Stage]]:
    """The recipe name and stages of a stages file, with config paths resolved against the file's folder."""
    data = yaml.safe_load(path.read_text())
    stages = []
    for entry in data.get("stages") or []:
        stage = Stage(entry["name"], (path.parent / entry["config"]).resolve(), entry.get("init_from"))
        known = [s.name for s in stages]
        if stage.init_from is not None and stage.init_from not in known:
            raise ValueError(
                f"{path}: stage {stage.name!r} starts from {stage.init_from!r}, which is not an earlier stage "
                f"({', '.join(known) or 'none'}); name one of them in init_from"
            )
        if not stage.config.is_file():
            raise FileNotFoundError(
                f"{path}: the config of stage {stage.name!r}, {stage.config}, does not exist"
            )
        stages.append(stage)
    if not stages:
        raise ValueError(f"{path} lists no stages; give `stages: [{{name: …, config: …}}, …]`")
    return str(data.get("recipe") or path.stem), stages


def is_stages_file(path: str | Path) -> bool:
    """Whether the config at ``path`` is a stages file (a top-level ``stages`` list)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def _split(args: list[str]) -> list[tuple[str, str | None]]:
    """``--key=value`` / ``--key value`` / ``--flag`` tokens as (key, value) pairs, in order."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if "=" in token:
            key, value = token.split("=", 1)
            pairs.append((key, value))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append((token, args[i + 1]))
            i += 1
        else:
            pairs.append((token, None))
        i += 1
    return pairs


def _tokens(pairs: list[tuple[str, str | None]]) -> list[str]:
    return [key if value is None else f"{key}={value}" for key, value in pairs]


def fit_stages(stages_path: Path, args: list[str]) -> Path:
    """Run every stage of ``stages_path`` into one run folder (see the module docstring); return the folder."""
    from recipes.cli import DEFAULT_ROOT, RUN_DIR_ENV, new_run_dir

    recipe, stages = read_stages(stages_path)
    pairs = _split(args)
    names = {stage.name for stage in stages}
    options: dict[str, Any] = {}
    common, per_stage = [], {name: [] for name in names}
    for key, value in pairs:
        prefix = key[2:].split(".", 1)[0]
        if prefix in names and "." in key:
            per_stage[prefix].append(("--" + key[2:].split(".", 1)[1], value))
        elif key in ("--run_dir", "--trainer.default_root_dir", "--model.prompt", "--model.init_args.prompt"):
            options[key] = value
            if key != "--run_dir":
                common.append((key, value))
        else:
            common.append((key, value))
    if options.get("--run_dir"):
        run_dir = Path(options["--run_dir"])
    else:
        first = yaml.safe_load(stages[0].config.read_text())
        prompt = options.get("--model.prompt") or options.get("--model.init_args.prompt")
        prompt = prompt or first["model"]["init_args"]["prompt"]
        root = Path(options.get("--trainer.default_root_dir") or DEFAULT_ROOT)
        run_dir = new_run_dir(root, recipe, prompt)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": recipe,
        "stages": [{"name": s.name, "config": str(s.config), "init_from": s.init_from} for s in stages],
        "overrides": _tokens(common),
        "stage_overrides": {name: _tokens(p) for name, p in per_stage.items() if p},
    }
    (run_dir / STAGES_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != RUN_DIR_ENV}
    for stage in stages:
        stage_dir = run_dir / stage.name
        if (stage_dir / "run.json").is_file():
            print(f"Stage {stage.name}: finished already in {stage_dir}, skipped", file=sys.stderr)
            continue
        command = [
            sys.executable,
            "-m",
            "recipes.cli",
            "fit",
            "-c",
            str(stage.config),
            "--run_dir",
            str(stage_dir),
        ]
        if stage.init_from is not None:
            command.append(f"--model.init_from={run_dir / stage.init_from}")
        command += _tokens(common) + _tokens(per_stage[stage.name])
        print(f"Stage {stage.name}: {' '.join(command[3:])}", file=sys.stderr)
        code = subprocess.call(command, env=env)
        if code != 0:
            raise SystemExit(
                f"stage {stage.name!r} failed (exit code {code}, its output is above); fix it, delete {stage_dir} "
                f"and rerun the same command with --run_dir {run_dir}: finished stages are kept"
            )
    print(f"Run folder: {run_dir}", file=sys.stderr)
    return run_dir


__all__ = ["Stage", "fit_stages", "is_stages_file", "read_stages"]
