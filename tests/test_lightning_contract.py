"""Every private Lightning name the plugin uses is listed in lightning_picard.compat and exists (lightning>=2.6,<2.7)."""

import ast
import importlib
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_picard.compat import PRIVATE_API
from lightning_picard.loop import PicardEpochLoop

PLUGIN = Path(__file__).resolve().parents[1] / "lightning_picard"


def _resolve(where: str) -> object:
    """A module, or a class (the longest importable module prefix, then attributes)."""
    parts = where.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(where)


def _instance(cls: type) -> object:
    """An instance carrying ``cls``'s instance attributes, built as the plugin meets one."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=3, enable_progress_bar=False)
    if issubclass(cls, pl.Trainer):
        return trainer
    if cls.__name__ == "_TrainingEpochLoop":
        return PicardEpochLoop(trainer, max_steps=3)
    if cls.__name__ == "_ResultMetric":
        from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata

        return cls(_Metadata(fx="training_step", name="x", on_step=True), is_tensor=True)
    if cls.__name__ == "_ResultCollection":
        return cls(training=True)
    if cls.__name__ == "_HandlersCompose":
        return cls([])
    return cls()


@pytest.mark.parametrize(("where", "name"), PRIVATE_API)
def test_every_listed_private_name_exists(where, name):
    target = _resolve(where)
    if isinstance(target, type) and not hasattr(target, name.split(".")[0]):
        target = _instance(target)
    for attribute in name.split("."):
        assert hasattr(target, attribute), f"{where}: {name}"
        target = getattr(target, attribute)


def _private_lightning_uses(path: Path) -> set[str]:
    """Private names imported from lightning, and ``x._name`` attributes whose name the plugin does not define."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
            found |= {alias.name for alias in node.names if alias.name.startswith("_")}
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.add(node.module)
    return found


def test_no_plugin_module_but_compat_imports_private_lightning_names():
    for path in sorted(PLUGIN.glob("*.py")):
        if path.name == "compat.py":
            continue
        assert not _private_lightning_uses(path), f"{path.name} imports {_private_lightning_uses(path)}"


def _lightning_private_names() -> set[str]:
    """Every ``_name`` Lightning's own source defines or reads as an attribute (``def _x``, ``.x``)."""
    import re

    import lightning

    names: set[str] = set()
    pattern = re.compile(r"(?:\bdef |\.)(_[A-Za-z][A-Za-z0-9_]*)\b")
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        names |= set(pattern.findall(path.read_text(errors="ignore")))
    return names


def test_private_attributes_read_by_the_plugin_are_all_listed():
    """Every private attribute the plugin's modules touch that is also a Lightning name is in PRIVATE_API, unless
    it is one of the plugin's own (set in an ``__init__`` of the plugin or in a class of its own)."""
    listed = {part for _, name in PRIVATE_API for part in name.split(".") if part.startswith("_")}
    ours = set()

    def stored(node: ast.AST) -> set[str]:
        return {
            n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
        }

    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                ours.add(node.name)
            if isinstance(node, ast.ClassDef) and not node.bases:
                ours |= stored(node)
            if isinstance(node, ast.FunctionDef) and node.name in ("__init__", "_init_picard_state"):
                ours |= stored(node)
    used = set()
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                used.add(node.attr)
    torch_names = {"_version"}  # Tensor._version, read by the step-hook state check
    lightning_names = _lightning_private_names()
    unlisted = sorted((used & lightning_names) - ours - listed - torch_names)
    assert not unlisted, f"private Lightning attributes used but not in compat.PRIVATE_API: {unlisted}"


def test_loop_internals_used_by_the_picard_loop():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=3)
    loop = PicardEpochLoop(trainer, max_steps=3)
    for attribute in ("batch_progress", "automatic_optimization", "update_lr_schedulers", "val_loop"):
        assert hasattr(loop, attribute), attribute
    for attribute in ("restarted_mid_evaluation", "increment_progress_to_evaluation_end", "restarting"):
        assert hasattr(loop.val_loop, attribute), attribute
    assert hasattr(loop.automatic_optimization.optim_progress.optimizer.step, "increment_by")
    assert hasattr(loop.batch_progress, "increment_by")
    for attribute in ("on_batch_start", "on_batch_end", "log_metrics", "metrics"):
        assert hasattr(type(trainer._logger_connector), attribute), attribute
    assert isinstance(trainer.fit_loop.epoch_loop, type(loop).__mro__[1])
