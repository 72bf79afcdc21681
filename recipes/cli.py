"""``lightning-picard``: the recipes' command line (LightningCLI with run folders, plus ``export``, ``plot``, ``eval``
and ``demo``).

::

    lightning-picard fit -c recipes/configs/dreamgaussian.yaml --model.prompt "a ripe strawberry"
    lightning-picard fit -c … --trainer.strategy=auto          # the sequential baseline, same per-step seeds
    lightning-picard test --ckpt_path RUN/checkpoints/last.ckpt  # the 120-view turntable into RUN/test
    lightning-picard export --ckpt_path RUN/checkpoints/last.ckpt  # the mesh into RUN/export
    lightning-picard plot RUN                                  # heat map and curves to PNG (RUN/plots)
    lightning-picard eval RUN… --clip MODEL                    # CLIP R-Precision, CLIP-FID of the turntables
    lightning-picard demo                                      # sequential vs Picard on this CPU
    lightning-picard fit -c recipes/configs/magic3d.yaml …     # a multi-stage recipe, stage after stage (stages.py)

``fit`` writes one folder per run, ``<root>/<recipe>/<prompt>@<time>`` with root ``--trainer.default_root_dir``
(default ``outputs``) or exactly ``--run_dir``: the resolved ``config.yaml``, ``metrics.csv``,
``checkpoints/`` (``last.ckpt`` at the end), ``val/`` images; ``test`` adds ``test/`` (turntable .mp4/.gif) and
``export`` adds ``export/`` (``mesh.obj`` with its texture, ``mesh.glb``); the :class:`~recipes.dashboard.Dashboard`
(``--dashboard.*``) adds ``picard_rounds.csv``, ``plots/`` and the end-of-fit turntable, and feeds W&B/TensorBoard. ``test`` and ``export`` find the
run's ``config.yaml`` from the checkpoint, so ``-c`` is only needed for a checkpoint outside a run folder.
A folder that already holds a run is never reused, except to resume it from one of its own checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_picard  # noqa: F401  (registers the "picard" strategies)
from recipes.dashboard import Dashboard
from recipes.system.module import TextTo3D

RUN_DIR_ENV = "LIGHTNING_PICARD_RUN_DIR"
"""Set by the launching process so that every rank of a multi-process run uses the same run folder."""
DEFAULT_ROOT = "outputs"
CONFIG_NAME = "config.yaml"


class RunFolderError(ValueError):
    """A run folder that cannot be used (it holds another run)."""


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of ``text``: ``"A ripe strawberry!"`` → ``"a_ripe_strawberry"``."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return cleaned[:limit].rstrip("_") or "run"


def new_run_dir(root: Path, recipe: str, prompt: str) -> Path:
    """``root/recipe/prompt@YYYYmmdd-HHMMSS`` (with ``-2``, ``-3`` … if that exists already)."""
    base = root / slug(recipe) / f"{slug(prompt)}@{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_run_dir_free(run_dir: Path, ckpt_path: str | None) -> None:
    """Raise :class:`RunFolderError` if ``run_dir`` holds a run, unless ``ckpt_path`` resumes that run."""
    if not (run_dir / CONFIG_NAME).exists():
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve()):
        return
    raise RunFolderError(
        f"run folder {run_dir} already holds a run; choose another --run_dir, or resume that run with "
        f"--ckpt_path {run_dir / 'checkpoints' / 'last.ckpt'}"
    )


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/x.ckpt`` or ``RUN/x.ckpt`` when
    ``RUN`` holds ``config.yaml``; else None."""
    path = Path(ckpt_path).resolve()
    for parent in (path.parent.parent, path.parent) if path.parent.name == "checkpoints" else (path.parent,):
        if (parent / CONFIG_NAME).exists():
            return parent
    return None


class RecipeCLI(LightningCLI):
    """LightningCLI for the recipes: :class:`~recipes.system.TextTo3D` models, camera datamodules, run folders."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        fitting = bool(args) and args[0] == "fit"
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "config_filename": CONFIG_NAME})
        if not fitting:
            kwargs.setdefault("save_config_callback", None)  # test/export never rewrite the run's config
        super().__init__(
            TextTo3D,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Exact run folder (default: <trainer.default_root_dir or outputs>/<recipe>/<prompt>@<time>).",
        )
        parser.add_lightning_class_args(Dashboard, "dashboard")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            run_dir = self._fit_run_dir(config)
            config.trainer.default_root_dir = str(run_dir)
            config.trainer.logger = run_folder_loggers(config.trainer.logger, run_dir)
        else:  # test, validate, predict, export: one process, outputs into the checkpoint's run folder
            ckpt_path = config.get("ckpt_path")
            run_dir = run_dir_of_checkpoint(ckpt_path) if ckpt_path else None
            if run_dir is not None:
                config.trainer.default_root_dir = str(run_dir)
            config.trainer.logger = False
            config.trainer.devices = 1
            config.trainer.num_nodes = 1
            config.trainer.strategy = "auto"

    def _fit_run_dir(self, config: Namespace) -> Path:
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited:  # a rank started by the launcher: the run folder was chosen by the first process
            return Path(inherited)
        if config.run_dir:
            run_dir = Path(config.run_dir)
            check_run_dir_free(run_dir, config.get("ckpt_path"))
        else:
            init_args = config.model.init_args
            root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
            run_dir = new_run_dir(root, init_args.recipe, init_args.prompt)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir

    def before_fit(self) -> None:
        self.model.check_data(self.datamodule)
        if self.config.fit.get("ckpt_path") is None:
            self.model.start_from_previous_stage()  # before anything is written; the ranks inherit or redo it
        self.model.scene.check_device(self.trainer.strategy.root_device)
        self.model.guidance_config.check_available()
        for callback in self.trainer.checkpoint_callbacks:
            if callback.save_last is None:
                callback.save_last = True
            if callback.dirpath is None:  # not under a logger's name/version folders
                callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
        print(f"Run folder: {self.trainer.default_root_dir}", file=sys.stderr)

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            self.model.check_checkpoint(load_checkpoint(ckpt_path), ckpt_path)


CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
FOLDERLESS_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", CSV_LOGGER)
"""Loggers that write into ``save_dir/name/version``: given empty ``name`` and ``version`` (the run folder itself)."""


def run_folder_loggers(logger: Any, run_dir: Path) -> Any:
    """The loggers of a fit, writing into ``run_dir``: a CSVLogger by default; a chosen one (``WandbLogger``,
    ``TensorBoardLogger``, …) without a ``save_dir`` of its own gets ``run_dir``, and a CSVLogger beside it, so that
    ``metrics.csv`` is always in the run folder (``lightning-picard plot`` reads it). ``False`` stays ``False``."""
    csv_logger = Namespace(
        class_path=CSV_LOGGER, init_args=Namespace(save_dir=str(run_dir), name="", version="")
    )
    if logger in (None, True):
        return csv_logger
    if logger is False:
        return False
    loggers = list(logger) if isinstance(logger, list) else [logger]
    for item in loggers:
        init_args = item.get("init_args") if isinstance(item, Namespace) else None
        if init_args is None:
            continue
        if init_args.get("save_dir") in (None, "", "."):
            init_args.save_dir = str(run_dir)
            if item.class_path in FOLDERLESS_LOGGERS:
                init_args.name, init_args.version = "", ""
    if not any(isinstance(item, Namespace) and item.get("class_path") == CSV_LOGGER for item in loggers):
        loggers.append(csv_logger)
    return loggers


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint from ``path`` (on CPU), with a clear error when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass --ckpt_path RUN/checkpoints/last.ckpt"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _with_run_config(argv: list[str]) -> list[str]:
    """Add ``-c RUN/config.yaml`` when the command names a checkpoint of a run folder and no config."""
    if any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in argv):
        return argv
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--ckpt_path")
    known, _ = probe.parse_known_args(argv[1:])
    run_dir = run_dir_of_checkpoint(known.ckpt_path) if known.ckpt_path else None
    if run_dir is None:
        return argv
    return [
        argv[0],
        "-c",
        str(run_dir / CONFIG_NAME) if argv[0] != "export" else run_config(run_dir / CONFIG_NAME),
        *argv[1:],
    ]


def _stages_file(argv: list[str]) -> str | None:
    """The ``-c`` argument of ``argv`` when it is a multi-stage recipe (:mod:`recipes.stages`), else None."""
    from recipes.stages import is_stages_file

    for flag, value in itertools.pairwise(argv):
        if flag in ("-c", "--config") and is_stages_file(value):
            return value
    return None


def run_config(path: Path) -> str:
    """A run's saved ``config.yaml`` as YAML text for ``-c`` of a ``run=False`` parser (``-c`` takes a path or YAML
    text): without the arguments of the Trainer methods, which such a parser does not have."""
    config = yaml.safe_load(path.read_text())
    for key in ("ckpt_path", "weights_only"):
        config.pop(key, None)
    return yaml.safe_dump(config)


def export(argv: list[str]) -> list[Path]:
    """``lightning-picard export [-c CONFIG] --ckpt_path CKPT [--out DIR]``: write the mesh of a checkpoint."""
    probe = argparse.ArgumentParser(prog="lightning-picard export", add_help=False)
    probe.add_argument("--ckpt_path", required=True, help="the checkpoint to export")
    probe.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    known, rest = probe.parse_known_args(argv)
    rest = [arg for arg in _with_run_config(["export", "--ckpt_path", known.ckpt_path, *rest])[1:]]
    rest = [
        arg for i, arg in enumerate(rest) if arg != "--ckpt_path" and (i == 0 or rest[i - 1] != "--ckpt_path")
    ]
    checkpoint = load_checkpoint(known.ckpt_path)
    cli = RecipeCLI(args=rest, run=False, save_config_callback=None)
    model = cli.model
    model.check_checkpoint(checkpoint, known.ckpt_path)
    model.load_state_dict(checkpoint["state_dict"])
    run_dir = run_dir_of_checkpoint(known.ckpt_path)
    out = Path(known.out) if known.out else (run_dir or Path(known.ckpt_path).parent) / "export"
    paths = model.export(out)
    for path in paths:
        print(f"Wrote {path}", file=sys.stderr)
    return paths


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``lightning-picard`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if argv else ""
    if command == "demo":
        from recipes.demo import main as demo_main

        return demo_main(argv[1:])
    if command == "export":
        return export(argv[1:])
    if command in COMMANDS:
        return _run_command(command, argv[1:])
    if command in ("test", "validate", "predict"):
        argv = _with_run_config(argv)
    if command == "fit":
        stages = _stages_file(argv)
        if stages is not None:
            from recipes.stages import fit_stages

            config_at = argv.index(stages) - 1
            return fit_stages(Path(stages), argv[1:config_at] + argv[config_at + 2 :])
    try:
        return RecipeCLI(args=argv)
    finally:
        if command == "fit" and os.environ.get("LOCAL_RANK", "0") == "0":
            os.environ.pop(RUN_DIR_ENV, None)


COMMANDS = {"plot": "recipes.dashboard.plots", "eval": "recipes.eval.command"}
"""Subcommands outside LightningCLI: name → module with ``main(argv)``."""


def _run_command(command: str, argv: list[str]) -> Any:
    """Run ``lightning-picard COMMAND``; its input errors (missing files, models) end in one line, exit status 2."""
    import importlib

    from recipes.dashboard.plots import NothingToPlotError

    module = importlib.import_module(COMMANDS[command])
    try:
        return module.main(argv)
    except (FileNotFoundError, NothingToPlotError) as error:
        print(f"lightning-picard {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def entry_point() -> None:
    """The console script: :func:`main` without a return value (``sys.exit`` would print it and exit 1)."""
    main()


if __name__ == "__main__":
    entry_point()
