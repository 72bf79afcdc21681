"""Run-folder naming and reuse rules of the recipes' command line."""

from pathlib import Path

import pytest

from recipes.cli import RunFolderError, check_run_dir_free, new_run_dir, run_dir_of_checkpoint, slug


def test_slugs_are_file_name_safe():
    assert slug("A ripe strawberry!") == "a_ripe_strawberry"
    assert slug("  ") == "run"
    assert len(slug("x" * 200)) == 48


def test_a_new_run_folder_never_collides(tmp_path: Path):
    first = new_run_dir(tmp_path, "dreamgaussian", "a cat")
    assert first.parent == tmp_path / "dreamgaussian" and first.name.startswith("a_cat@")
    first.mkdir(parents=True)
    second = new_run_dir(tmp_path, "dreamgaussian", "a cat")
    assert second != first and not second.exists()


def test_a_folder_with_a_run_is_reused_only_to_resume_it(tmp_path: Path):
    run = tmp_path / "run"
    check_run_dir_free(run, None)  # empty: fine
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(RunFolderError, match="resume that run with --ckpt_path"):
        check_run_dir_free(run, None)
    with pytest.raises(RunFolderError):
        check_run_dir_free(run, str(tmp_path / "elsewhere" / "last.ckpt"))
    check_run_dir_free(run, str(run / "checkpoints" / "last.ckpt"))
    assert run_dir_of_checkpoint(run / "checkpoints" / "last.ckpt") == run.resolve()
    assert run_dir_of_checkpoint(tmp_path / "elsewhere" / "last.ckpt") is None
