"""Stage hand-over: the trained scene of an earlier run, rebuilt from its run folder for ``model.init_from``.

A multi-stage recipe (Magic3D: NeRF coarse → DMTet refine) starts each stage from the previous stage's result:
``--model.init_from RUN`` (a run folder, or one of its checkpoints) rebuilds that run's scene from its saved
``config.yaml``, loads the checkpoint's scene parameters into it, and hands it to the new scene's
:meth:`~recipes.system.scene.Scene.init_from`, which converts what it can use.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from recipes.system.scene import Scene

SCENE_PREFIX = "scene."


def stage_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself if a file, else ``path/checkpoints/last.ckpt``."""
    path = Path(path)
    checkpoint = path if path.is_file() else path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"model.init_from: {path} is neither a checkpoint nor a finished run folder (no {checkpoint}); pass "
            "the earlier stage's run folder or its checkpoints/last.ckpt"
        )
    return checkpoint


def load_stage_scene(path: str | Path) -> tuple[Scene, dict[str, str]]:
    """The trained scene of the run at ``path`` and that run's ``{"name": recipe, "scene": class name}``."""
    from recipes.cli import CONFIG_NAME, load_checkpoint, run_dir_of_checkpoint

    checkpoint_path = stage_checkpoint(path)
    run_dir = run_dir_of_checkpoint(checkpoint_path)
    if run_dir is None:
        raise FileNotFoundError(
            f"model.init_from: {checkpoint_path} is not inside a run folder (no {CONFIG_NAME} next to it); pass "
            "the earlier stage's run folder"
        )
    import yaml

    config = yaml.safe_load((run_dir / CONFIG_NAME).read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--scene", type=Scene)
    parsed = parser.parse_object({"scene": config["model"]["init_args"]["scene"]})
    instantiate = (
        getattr(parser, "instantiate", None) or parser.instantiate_classes
    )  # renamed in jsonargparse 4.49
    scene = instantiate(parsed).scene
    checkpoint = load_checkpoint(checkpoint_path)
    state = {
        key[len(SCENE_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(SCENE_PREFIX)
    }
    scene.load_state_dict(state)
    origin = checkpoint.get("recipe") or {"name": "unknown", "scene": type(scene).__name__}
    return scene.eval(), origin


def start_from_stage(scene: Scene, path: str | Path) -> None:
    """Initialise ``scene`` from the run at ``path``; a run of a representation it cannot use is one error."""
    previous, origin = load_stage_scene(path)
    try:
        scene.init_from(previous)
    except ValueError as error:
        raise ValueError(
            f"model.init_from: {path} is a run of recipe {origin['name']!r} ({origin['scene']}): {error}"
        ) from None


__all__ = ["load_stage_scene", "stage_checkpoint", "start_from_stage"]
