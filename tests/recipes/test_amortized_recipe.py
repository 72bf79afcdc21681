"""Amortized text-to-3D (ScaleDreamer) through the ``lightning-picard`` command line: a 3-prompt corpus, weight-free
(3 procedural objects, a tiny Hyper-iNGP, ASD on their closed-form priors), 16x16, 4 steps of 2 prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_recipe_cli import assert_close_but_for_adam_rounding, final_state
from tiny_models import tiny_sd_folder  # noqa: F401  (module-scoped fixture)

from recipes.cli import main

CONFIGS = Path(__file__).parents[2] / "recipes" / "configs"
CORPUS = CONFIGS / "corpora" / "procedural-3.json"
TWO_RANKS = [
    "--trainer.devices=2",
    "--trainer.strategy=lightning_picard.PicardStrategy",
    "--trainer.strategy.window_size=3",
    "--trainer.strategy.threshold=0.0",
    "--trainer.strategy.start_method=fork",
]


def amortized_fit(run_dir: Path, *overrides: str) -> Path:
    main(
        [
            "fit",
            "-c",
            str(CONFIGS / "smoke" / "amortized.yaml"),
            "--run_dir",
            str(run_dir),
            f"--model.corpus.path={CORPUS}",
            f"--model.corpus.cache_dir={run_dir.parent / 'cache'}",
            "--dashboard.turntable=false",  # the test command renders the turntables
            *overrides,
        ]
    )
    return run_dir


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each Picard process
    try:
        return amortized_fit(tmp_path_factory.mktemp("amortized") / "sequential")
    finally:
        torch.set_num_threads(threads)


def test_a_three_prompt_corpus_trains_on_one_rank(sequential):
    info = json.loads((sequential / "run.json").read_text())
    assert info["steps"] == 4 and info["strategy"] == "SingleDeviceStrategy"
    header = (sequential / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_asd" in header and "train/loss_eikonal" in header
    state = final_state(sequential)
    assert any(name.startswith("scene.generator.hypernet.") for name in state)
    assert not any("geometry" in name for name in state)  # the per-prompt fields are never state
    assert list((sequential / "val").glob("step000004-view00.png"))


@pytest.mark.multiprocess
def test_two_rank_picard_at_threshold_zero_equals_the_sequential_run_bit_for_bit(sequential, tmp_path):
    picard = amortized_fit(tmp_path / "picard", *TWO_RANKS)
    info = json.loads((picard / "run.json").read_text())
    assert info["strategy"] == "PicardStrategy" and info["world_size"] == 2
    ours, theirs = final_state(picard), final_state(sequential)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_held_out_prompts_render_a_turntable_each_and_export_a_mesh_each(sequential):
    checkpoint = str(sequential / "checkpoints" / "last.ckpt")
    main(["test", "--ckpt_path", checkpoint])
    folders = sorted((sequential / "test" / "prompts").iterdir())
    prompts = [json.loads((f / "run.json").read_text())["prompt"] for f in folders]
    assert prompts == [
        "a blue box with orange stripes",
        "a purple sphere with cream stripes",
    ]  # the 2nd is held out
    for folder in folders:
        assert list((folder / "test").glob("turntable-step000004.mp4"))
    paths = main(["export", "--ckpt_path", checkpoint])
    assert sorted(p.name for p in paths) == [
        "000-a_blue_box_with_orange_stripes.glb",
        "000-a_blue_box_with_orange_stripes.obj",
        "001-a_purple_sphere_with_cream_stripes.glb",
        "001-a_purple_sphere_with_cream_stripes.obj",
    ]


def test_the_closed_form_prior_refuses_a_train_prompt_it_has_no_object_for(tmp_path):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("a red sphere with yellow stripes\na ripe strawberry\n")
    with pytest.raises(ValueError, match="'a ripe strawberry' is not the caption of a procedural object"):
        main(
            [
                "fit",
                "-c",
                str(CONFIGS / "smoke" / "amortized.yaml"),
                "--run_dir",
                str(tmp_path / "run"),
                f"--model.corpus.path={corpus}",
            ]
        )


def test_a_text_corpus_trains_on_stable_diffusion_with_pooled_clip_embeddings(tiny_sd_folder, tmp_path):  # noqa: F811
    """The GPU configs' path on a tiny random Stable Diffusion from a local folder: pooled CLIP embeddings for the
    generator and every prompt's view-dependent embeddings for the UNet, both cached once; a prompt longer than the
    tiny tokenizer's 16 (character) tokens is truncated with a warning."""
    corpus = tmp_path / "prompts.txt"
    long = "a very long prompt about a small wooden boat that floats on a calm lake under a clear blue sky at noon"
    corpus.write_text(f"a cat\na dog\n{long}\n")
    cache = tmp_path / "cache"
    sd = [
        f"--model.corpus.path={corpus}",
        "--model.guidance.model=stable-diffusion",
        f"--model.guidance.pretrained_model_name_or_path={tiny_sd_folder}",
        "--model.guidance.image_resolution=16",
        f"--model.prompt_options.cache_dir={cache}",
        "--model.text_encoder.name=clip",
        "--model.text_encoder.embedding_dim=32",
        "--model.text_encoder.max_tokens=16",
        "--model.scene.init_args.generator.init_args.config.embedding_dim=32",
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
    ]
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the 16 tokens"):
        run_dir = amortized_fit(tmp_path / "sd", *sd)
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 1
    files = list(cache.glob("*.pt"))
    assert len(files) == 3 + 1 + 3 * 5  # 3 pooled, the negative, 3 prompts × (plain + 4 view directions)


@pytest.mark.parametrize(
    ("config", "generator"),
    [
        ("scaledreamer-mg15", "recipes.geometry.hyper_ingp.HyperINGP"),
        ("scaledreamer-df415", "recipes.geometry.conv3d_generator.Conv3DGenerator"),
    ],
)
def test_the_scaledreamer_configs_parse(config, generator, capsys):
    pytest.importorskip(generator.rsplit(".", 1)[0])  # the 3DConv-net comes from its own branch
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert f"class_path: {generator}" in printed and "method: asd" in printed and "window_size: 7" in printed
    assert "batch_size: 1" in printed and "path: load/" in printed


def test_the_100k_config_is_df415s_at_channel_multiplier_2_with_8_prompts_a_step():
    df415, cp100k = (
        yaml.safe_load((CONFIGS / f"scaledreamer-{n}.yaml").read_text()) for n in ("df415", "cp100k")
    )
    channels = [
        g["model"]["init_args"]["scene"]["init_args"]["generator"]["init_args"]["config"]["channels"]
        for g in (df415, cp100k)
    ]
    assert channels[1][3:] == [2 * c for c in channels[0][3:]] and channels[1][:3] == channels[0][:3]
    assert cp100k["data"]["init_args"]["cameras"]["batch_size"] == 8
    assert cp100k["model"]["init_args"]["corpus"]["path"] == "load/cap3d_100k_prompt_library.json"
    assert cp100k["trainer"]["max_steps"] == 300_000


@pytest.mark.parametrize("method", ["sds", "vsd"])
def test_sds_and_vsd_train_the_generator_too(method, tmp_path):
    """VSD on the closed-form prior trains a rank-local adapter over every object's 36 references."""
    run_dir = amortized_fit(
        tmp_path / method, f"--model.distillation.method={method}", "--trainer.max_steps=2"
    )
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert f"train/loss_{method}" in header and ("train/loss_particle" in header) == (method == "vsd")
    state = final_state(run_dir)
    if method == "vsd":
        assert (
            state["particle.delta"].shape == (3 * 36, 3, 16, 16) and state["particle.delta"].abs().sum() > 0
        )


def _conv3d_config(tmp_path: Path, voxel_noise: str) -> Path:
    """The smoke config with a tiny 3DConv-net generator in place of Hyper-iNGP."""
    config = yaml.safe_load((CONFIGS / "smoke" / "amortized.yaml").read_text())
    scene = config["model"]["init_args"]["scene"]["init_args"]
    scene["generator"] = {
        "class_path": "recipes.geometry.conv3d_generator.Conv3DGenerator",
        "init_args": {"config": {**_tiny_conv3d(), "embedding_dim": 16, "voxel_noise": voxel_noise}},
    }
    path = tmp_path / "conv3d.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tiny_conv3d() -> dict:
    from dataclasses import asdict

    from recipes.geometry.conv3d_generator import Conv3DGeneratorConfig

    values = json.loads(json.dumps(asdict(Conv3DGeneratorConfig.tiny())))  # tuples as lists, for YAML
    return {k: v for k, v in values.items() if k != "embedding_dim"}


@pytest.mark.parametrize("method", ["csd", "asd"])
def test_the_3dconv_generator_with_random_voxel_noise_trains_through_the_cli(method, tmp_path):
    """ScaleDreamer's 3DConv-net (random per-voxel noise from each batch item's own stream) with CSD and ASD."""
    config = _conv3d_config(tmp_path, "random")
    main(
        [
            "fit", "-c", str(config), "--run_dir", str(tmp_path / "run"), f"--model.corpus.path={CORPUS}",
            f"--model.corpus.cache_dir={tmp_path / 'cache'}", "--dashboard.turntable=false",
            f"--model.distillation.method={method}", "--trainer.max_steps=2",
        ]
    )  # fmt: skip
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert f"train/loss_{method}" in header
    assert any(name.startswith("scene.generator.mapping") for name in final_state(tmp_path / "run"))


SLOT_GROUPS = [
    "--trainer.strategy=lightning_picard.PicardStrategy",
    "--trainer.strategy.threshold=0.0",
    "--trainer.strategy.start_method=fork",
    "--trainer.strategy.slot_group_size=2",
]


@pytest.mark.multiprocess
def test_two_slots_of_two_ranks_equal_two_rank_data_parallel_bit_for_bit(sequential, tmp_path):
    """4 gloo processes, 2 slots × 2 ranks (each rank renders one of a step's 2 prompts), at threshold 0: equal
    to the 2-rank data-parallel run (window 1) bit for bit, and to the one-process run to rounding (a mean of 2
    prompts' losses against the average of two 1-prompt means; Adam turns a rounding difference in a near-zero
    gradient into up to a step's difference: on an Intel Xeon all within 2e-5 after 4 steps, on an AMD EPYC 2 of
    8192 hash entries 7.6e-4 apart)."""
    time_and_data = amortized_fit(tmp_path / "dp-tp", "--trainer.devices=4", *SLOT_GROUPS)
    data_parallel = amortized_fit(
        tmp_path / "dp", "--trainer.devices=2", *SLOT_GROUPS, "--trainer.strategy.window_size=1"
    )
    ours, theirs, sequential_state = (
        final_state(time_and_data),
        final_state(data_parallel),
        final_state(sequential),
    )
    assert json.loads((time_and_data / "run.json").read_text())["world_size"] == 4
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
        assert_close_but_for_adam_rounding(
            ours[name], sequential_state[name], 1e-4, lr=0.01, steps=4, name=name
        )
