"""Multi-stage recipes through the command line: Magic3D's coarse → refine hand-over (smoke configs, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
import trimesh
from test_recipe_cli import EXACT_PICARD, SMOKE
from test_recipe_cli import final_state as state

import recipes.stages
from recipes.cli import main
from recipes.geometry.hashgrid import HashGridConfig
from recipes.geometry.mlp import MLPConfig
from recipes.geometry.texture import TextureFieldConfig
from recipes.system import DMTetGrid, DMTetScene, NeRFScene
from recipes.system.handover import load_stage_scene


def in_process(command: list[str], env: dict[str, str]) -> int:
    """What the stage runner's ``python -m recipes.cli fit …`` does, in this process (no interpreter start)."""
    assert command[1:4] == ["-m", "recipes.cli", "fit"]
    main(command[3:])
    return 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """``lightning-picard fit -c smoke/magic3d.yaml``: coarse then refine into one run folder, one thread."""
    run_dir = tmp_path_factory.mktemp("magic3d") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(recipes.stages.subprocess, "call", in_process)
            assert main(["fit", "-c", str(SMOKE / "magic3d.yaml"), "--run_dir", str(run_dir)]) == run_dir
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_the_stages_share_one_run_folder(chain):
    assert (chain / "stages.yaml").is_file()
    for stage, recipe in (("coarse", "magic3d-coarse"), ("refine", "magic3d-refine")):
        info = json.loads((chain / stage / "run.json").read_text())
        assert info["recipe"] == recipe and info["steps"] == 4
    refine_config = (chain / "refine" / "config.yaml").read_text()
    assert f"init_from: {chain / 'coarse'}" in refine_config


def test_the_refine_stage_starts_from_the_coarse_field_and_trains_on(chain):
    coarse, _ = load_stage_scene(chain / "coarse")
    assert isinstance(coarse, NeRFScene)
    converted = DMTetScene(
        grid=DMTetGrid(resolution=8),  # the smoke refine grid and texture field
        texture=TextureFieldConfig(
            encoding=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0),
            mlp=MLPConfig(n_neurons=16),
        ),
        background="solid",
    )
    fresh_sdf = converted.geometry.sdf.detach().clone()
    converted.init_from(coarse)
    assert not torch.equal(converted.geometry.sdf, fresh_sdf)  # not the sphere it starts as
    inside = coarse.geometry.density(converted.geometry.grid_vertices) > 5.0
    assert (converted.geometry.sdf[inside] < 0).any() and (converted.geometry.sdf[~inside] > 0).any()
    assert torch.equal(converted.texture.encoding.tables, coarse.geometry.encoding.tables)
    refined = state(chain / "refine")
    assert not torch.equal(refined["scene.geometry.sdf"], converted.geometry.sdf)  # four steps later
    assert refined["scene.geometry.sdf"].sign().eq(converted.geometry.sdf.sign()).float().mean() > 0.9


@pytest.mark.multiprocess
def test_two_rank_picard_refine_at_threshold_zero_equals_the_sequential_one(chain, tmp_path):
    picard = tmp_path / "refine-picard"
    main(
        [
            "fit", "-c", str(SMOKE / "magic3d-refine.yaml"), "--run_dir", str(picard),
            f"--model.init_from={chain / 'coarse'}", *EXACT_PICARD,
        ]
    )  # fmt: skip
    assert json.loads((picard / "run.json").read_text())["world_size"] == 2
    ours, theirs = state(picard), state(chain / "refine")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_the_refined_turntable_and_mesh_are_written_and_reopen(chain):
    checkpoint = str(chain / "refine" / "checkpoints" / "last.ckpt")
    main(["test", "--ckpt_path", checkpoint])
    (gif,) = (chain / "refine" / "test").glob("*.gif")
    assert iio.imread(gif).shape[0] == 4  # the smoke config's test views
    paths = main(["export", "--ckpt_path", checkpoint])
    assert {p.suffix for p in paths} == {".obj", ".glb"}
    for path in paths:
        assert len(trimesh.load(path, force="mesh").faces) > 0


def test_rerunning_the_chain_skips_finished_stages(chain, capsys):
    before = state(chain / "refine")
    main(["fit", "-c", str(SMOKE / "magic3d.yaml"), "--run_dir", str(chain)])
    assert capsys.readouterr().err.count("finished already") == 2
    after = state(chain / "refine")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_refine_stage_pointed_at_another_representation_is_refused(tmp_path):
    gaussians = tmp_path / "gaussians"
    main(
        ["fit", "-c", str(SMOKE / "dreamgaussian.yaml"), "--run_dir", str(gaussians), "--trainer.max_steps=1"]
    )
    with pytest.raises(
        ValueError, match=r"is a run of recipe 'dreamgaussian' \(GaussianScene\).*DMTetScene starts"
    ):
        main(["fit", "-c", str(SMOKE / "magic3d-refine.yaml"), "--run_dir", str(tmp_path / "run"),
              f"--model.init_from={gaussians}"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_dmtet_stage_starts_from_an_earlier_one_and_the_texture_stage_trains_only_the_texture(chain):
    refined, _ = load_stage_scene(chain / "refine")
    texture_stage = DMTetScene(
        grid=DMTetGrid(resolution=8), texture=refined.texture.config, stage="texture", background="solid"
    )
    texture_stage.init_from(refined)
    assert torch.equal(texture_stage.geometry.sdf, refined.geometry.sdf)
    assert torch.equal(texture_stage.texture.encoding.tables, refined.texture.encoding.tables)
    optimizer, _ = texture_stage.configure_optimizers()
    assert [group["name"] for group in optimizer.param_groups] == ["texture", "feature_network"]
    geometry_stage = DMTetScene(grid=DMTetGrid(resolution=8), stage="geometry", background="solid")
    optimizer, _ = geometry_stage.configure_optimizers()
    assert [group["name"] for group in optimizer.param_groups] == ["grid"]
    with pytest.raises(ValueError, match="grid of resolution 8"):
        DMTetScene(grid=DMTetGrid(resolution=6)).init_from(refined)


def test_a_missing_earlier_stage_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a finished run folder"):
        main(["fit", "-c", str(SMOKE / "magic3d-refine.yaml"), "--run_dir", str(tmp_path / "run"),
              f"--model.init_from={tmp_path / 'nothing'}"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_stage_starting_from_a_later_one_is_refused(tmp_path):
    stages = tmp_path / "bad.yaml"
    stages.write_text(
        f"stages:\n  - {{name: refine, config: {SMOKE / 'magic3d-refine.yaml'}, init_from: coarse}}\n"
    )
    with pytest.raises(ValueError, match="not an earlier stage"):
        main(["fit", "-c", str(stages)])


def test_stage_prefixed_overrides_reach_only_their_stage():
    pairs = recipes.stages._split(["--refine.trainer.max_steps=3", "--model.prompt", "a cat", "--x"])
    assert pairs == [("--refine.trainer.max_steps", "3"), ("--model.prompt", "a cat"), ("--x", None)]
