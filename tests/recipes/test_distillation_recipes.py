"""ScaleDreamer ASD and ProlificDreamer (VSD) through the ``lightning-picard`` command line (smoke configs, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_recipe_cli import SMOKE, final_state, fit, one_thread_fit
from tiny_models import tiny_sd_folder, tiny_sd_v_folder  # noqa: F401  (module-scoped fixtures)

from recipes.cli import main
from recipes.guidance.prior_particle import PriorParticleConfig, PriorParticleScore, ReferenceAdapter
from recipes.system.distillation import DistillationConfig

PICARD = [
    "--trainer.strategy=lightning_picard.PicardStrategy",
    "--trainer.strategy.threshold=0.0",
    "--trainer.strategy.start_method=fork",
]
TWO_RANKS = ["--trainer.devices=2", *PICARD, "--trainer.strategy.window_size=3"]
REPLAYED = [
    "--model.distillation.particle.placement=replayed",
    "--model.scene.optimizer.name=adamw",
    "--model.distillation.particle.prior.start=renders",  # set before the Picard state exists, or not exact
]


def assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], prefix: str = "") -> None:
    names = [n for n in ours if n.startswith(prefix)]
    assert names and names == [n for n in theirs if n.startswith(prefix)]
    for name in names:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distillation")
    return {
        "asd": one_thread_fit("asd", root / "asd"),
        "vsd": one_thread_fit("prolificdreamer-coarse", root / "vsd"),
        "vsd-replayed": one_thread_fit("prolificdreamer-coarse", root / "vsd-replayed", *REPLAYED),
    }


def test_the_smoke_runs_train_the_scene_and_vsd_its_particle(runs):
    for name, run_dir in runs.items():
        info = json.loads((run_dir / "run.json").read_text())
        assert info["steps"] == 4 and info["strategy"] == "SingleDeviceStrategy", name
        header = (run_dir / "metrics.csv").read_text().splitlines()[0]
        method = "asd" if name == "asd" else "vsd"
        assert f"train/loss_{method}" in header and ("train/loss_particle" in header) == (method == "vsd")
    particle = {n: p for n, p in final_state(runs["vsd"]).items() if n.startswith("particle.")}
    assert particle.keys() == {"particle.delta"} and particle["particle.delta"].shape == (36, 3, 16, 16)
    assert particle["particle.delta"].abs().sum() > 0  # it starts at zero: it trained


@pytest.mark.multiprocess
def test_asd_on_two_ranks_at_threshold_zero_equals_the_sequential_run_bit_for_bit(runs, tmp_path):
    picard = fit("asd", tmp_path / "picard", *TWO_RANKS)
    assert json.loads((picard / "run.json").read_text())["world_size"] == 2
    assert_equal(final_state(picard), final_state(runs["asd"]))


@pytest.mark.multiprocess
def test_vsd_with_a_replayed_particle_is_exact_on_two_ranks(runs, tmp_path):
    """The paper's rejected option makes the particle Picard state: the whole run is the sequential one."""
    picard = fit("prolificdreamer-coarse", tmp_path / "picard", *TWO_RANKS, *REPLAYED)
    assert_equal(final_state(picard), final_state(runs["vsd-replayed"]))


@pytest.mark.multiprocess
def test_vsd_with_rank_local_particles(runs, tmp_path):
    """Window 1 on one rank is the sequential run, 3D parameters and particle alike. On two ranks the particle that
    shapes each gradient has been trained on that rank's evaluations (speculative ones included), so the 3D
    parameters leave the sequential trajectory even at threshold 0 (docs/recipes/recipes.md)."""
    sequential = final_state(runs["vsd"])
    one_rank = one_thread_fit(
        "prolificdreamer-coarse", tmp_path / "one", *PICARD, "--trainer.strategy.window_size=1"
    )
    assert_equal(final_state(one_rank), sequential)
    two_ranks = fit("prolificdreamer-coarse", tmp_path / "two", *TWO_RANKS)
    info = json.loads((two_ranks / "run.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == 4
    state = final_state(two_ranks)
    assert state.keys() == sequential.keys()
    scene = [n for n in state if n.startswith("scene.renderer.geometry")]
    assert any(not torch.equal(state[n], sequential[n]) for n in scene)


@pytest.mark.parametrize("name", ["asd", "vsd"])
def test_test_and_export_work(runs, name):
    checkpoint = str(runs[name] / "checkpoints" / "last.ckpt")
    main(["test", "--ckpt_path", checkpoint])
    assert list((runs[name] / "test").glob("*.mp4"))
    paths = main(["export", "--ckpt_path", checkpoint])
    assert {p.suffix for p in paths} == {".obj", ".glb"}


def test_vsd_on_stable_diffusion_trains_a_rank_local_lora(tiny_sd_folder, tiny_sd_v_folder, tmp_path):  # noqa: F811
    """The real path: peft LoRA on a (tiny, random) v-prediction UNet loaded from a folder, checkpointed, exported."""
    run_dir = fit(
        "prolificdreamer-coarse",
        tmp_path / "sd",
        "--model.guidance.model=stable-diffusion",
        f"--model.guidance.pretrained_model_name_or_path={tiny_sd_folder}",
        "--model.guidance.image_resolution=16",
        f"--model.distillation.particle.lora.pretrained_model_name_or_path={tiny_sd_v_folder}",
        f"--model.prompt_options.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    )
    state = final_state(run_dir)
    lora = [n for n in state if n.startswith("particle.tensors.")]
    assert any("lora_B" in n for n in lora) and any("class_embedding" in n for n in lora)
    assert not any(n.startswith("particle.") and n not in lora for n in state)  # never the frozen UNet
    assert any(state[n].abs().sum() > 0 for n in lora if "lora_B" in n)  # B starts at 0: it trained
    paths = main(["export", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert {p.suffix for p in paths} == {".obj", ".glb"}


def test_vsd_on_a_unet_without_the_lora_targets_says_what_to_do(tiny_sd_folder, tmp_path):  # noqa: F811
    with pytest.raises(
        ValueError, match=r"has none of them; set model\.distillation\.particle\.lora\.target_modules"
    ):
        fit(
            "prolificdreamer-coarse",
            tmp_path / "sd",
            "--model.guidance.model=stable-diffusion",
            f"--model.guidance.pretrained_model_name_or_path={tiny_sd_folder}",
            "--model.guidance.image_resolution=16",
            f"--model.distillation.particle.lora.pretrained_model_name_or_path={tiny_sd_folder}",
            "--model.distillation.particle.lora.target_modules=[no_such_projection]",
            f"--model.prompt_options.cache_dir={tmp_path / 'cache'}",
        )


def test_vsd_on_deepfloyd_if_is_refused():
    from recipes.system.guidance import GuidanceConfig

    with pytest.raises(ValueError, match="VSD needs"):
        DistillationConfig(method="vsd").check_guidance(GuidanceConfig(model="deepfloyd-if"))
    with pytest.raises(ValueError, match="unknown distillation method"):
        DistillationConfig(method="dds")


def test_the_prior_particle_starts_as_the_prior_and_learns_the_renders():
    from recipes.data.procedural import reference_cameras
    from recipes.guidance.closed_form import ClosedFormPrior
    from recipes.guidance.lora import ParticleCondition

    prior = ClosedFormPrior.from_procedural_object(height=8)
    particle = PriorParticleScore(
        prior, ReferenceAdapter(tuple(prior.references.shape)), PriorParticleConfig(learning_rate=5e-2)
    )
    cameras = reference_cameras(height=8, width=8)
    views = cameras.c2w[[0, 7]]
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([300, 700])
    camera = ParticleCondition(None, views.reshape(2, 16))
    assert torch.allclose(
        particle.predict_noise(x_t, t, camera), prior.predict_noise(x_t, t, views), atol=1e-5
    )
    assert torch.allclose(particle.predict_noise(x_t, t, None), prior.predict_noise(x_t, t, None), atol=1e-5)
    renders = torch.rand(2, 3, 8, 8) * 2 - 1
    optimizer = particle.configure_lora_optimizer()
    losses = []
    for step in range(40):
        loss = particle.lora_loss(renders, camera, torch.Generator().manual_seed(step % 4))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_a_particle_started_from_renders_is_the_denoiser_of_those_renders():
    from recipes.guidance.closed_form import ClosedFormPrior
    from recipes.guidance.lora import ParticleCondition

    prior = ClosedFormPrior.from_procedural_object(height=8)
    particle = PriorParticleScore(
        prior, ReferenceAdapter(tuple(prior.references.shape)), PriorParticleConfig()
    )
    renders = torch.rand(prior.references.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    particle.start_from(renders)
    of_renders = ClosedFormPrior(renders, prior.reference_directions, sigma_deg=prior.sigma_deg)
    x_t, t = torch.randn(3, 3, 8, 8), torch.tensor([50, 400, 900])
    views = torch.eye(4).repeat(3, 1, 1)
    for condition, views_or_none in ((ParticleCondition(None, views.reshape(3, 16)), views), (None, None)):
        assert torch.allclose(
            particle.predict_noise(x_t, t, condition),
            of_renders.predict_noise(x_t, t, views_or_none),
            atol=1e-4,
        )
    with pytest.raises(ValueError, match="one render per reference"):
        particle.start_from(renders[:-1])


def test_the_system_starts_the_particle_from_its_scene_before_the_first_step(tmp_path):
    """``particle.prior.start: renders``: at ``setup`` of a fresh fit (before the optimizers and the Picard state
    exist) the adapter is set so that the adapted references are the scene's renders from the reference cameras;
    ``prior`` (the default) leaves it at zero."""
    import lightning.pytorch as pl

    from recipes.cli import RecipeCLI
    from recipes.data.procedural import reference_cameras

    def model_with(start: str):
        model = RecipeCLI(
            args=[
                "-c",
                str(SMOKE / "prolificdreamer-coarse.yaml"),
                f"--model.init_args.distillation.particle.prior.start={start}",
            ],
            run=False,
            save_config_callback=None,
        ).model
        model.trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
        model.setup("fit")
        return model

    assert model_with("prior").particle.delta.abs().sum() == 0
    model = model_with("renders")
    height = model.guidance_config.closed_form.height
    renders = model.render_views(reference_cameras(height=height, width=height)).permute(0, 3, 1, 2) * 2 - 1
    references = model.distiller.particle.prior.references
    assert torch.allclose(references + model.particle.delta, renders, atol=1e-6)
    assert model.particle.delta.abs().sum() > 0


def test_a_particle_adapter_of_another_size_is_refused():
    from recipes.guidance.closed_form import ClosedFormPrior

    prior = ClosedFormPrior.from_procedural_object(height=8)
    with pytest.raises(ValueError, match=r"same guidance\.closed_form settings"):
        PriorParticleScore(prior, ReferenceAdapter((36, 3, 16, 16)), PriorParticleConfig())


@pytest.mark.parametrize(
    ("config", "method", "threshold", "aggregate"),
    [
        ("asd", "asd", 5e-6, "median"),
        ("prolificdreamer-coarse", "vsd", 3e-5, "mean"),
        ("prolificdreamer-geometry", "sds", 5e-5, "mean"),
        ("prolificdreamer-texture", "vsd", 3e-5, "mean"),
    ],
)
def test_the_paper_configs_parse_with_the_papers_picard_settings(config, method, threshold, aggregate):
    from recipes.cli import RecipeCLI

    path = Path(__file__).parents[2] / "recipes" / "configs" / f"{config}.yaml"
    cli = RecipeCLI(args=["-c", str(path)], run=False, save_config_callback=None)
    assert cli.model.distillation_config.method == method
    assert cli.model.guidance_config.model == "stable-diffusion"
    strategy = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_picard.PicardStrategy"
    args = strategy["init_args"]
    assert (args["window_size"], args["threshold"], args["ema_decay"], args["aggregate"]) == (
        7,
        threshold,
        0.9,
        aggregate,
    )


def test_the_dmtet_stages_continue_the_vsd_nerf(runs, tmp_path):
    """ProlificDreamer's stages 2 and 3: the coarse NeRF becomes a DMTet shape (trained alone), whose texture is then
    trained by VSD with the shape frozen."""
    geometry = fit("prolificdreamer-geometry", tmp_path / "geometry", f"--model.init_from={runs['vsd']}")
    texture = fit("prolificdreamer-texture", tmp_path / "texture", f"--model.init_from={geometry}")
    shaped, textured = final_state(geometry), final_state(texture)
    for name in ("scene.geometry.sdf", "scene.geometry.deformation"):
        assert torch.equal(textured[name], shaped[name]), name  # frozen in the texture stage
    changed = [
        n for n in textured if n.startswith("scene.texture.") and not torch.equal(textured[n], shaped[n])
    ]
    assert changed and textured["particle.delta"].abs().sum() > 0


def test_the_cpu_size_prolificdreamer_chain_parses_and_its_stages_hand_over():
    """demo/prolificdreamer-chain.yaml (docs/benchmarks.md): three closed-form configs whose texture fields can take
    the coarse NeRF's colour and whose DMTet grids match, each with the paper's Picard threshold for its stage."""
    from recipes.cli import RecipeCLI
    from recipes.stages import read_stages

    recipe, stages = read_stages(SMOKE.parent / "demo" / "prolificdreamer-chain.yaml")
    assert recipe == "prolificdreamer"
    assert [(s.name, s.init_from) for s in stages] == [
        ("coarse", None),
        ("geometry", "coarse"),
        ("texture", "geometry"),
    ]
    models = {}
    for stage in stages:
        models[stage.name] = RecipeCLI(
            args=["-c", str(stage.config)], run=False, save_config_callback=None
        ).model
        assert models[stage.name].guidance_config.model == "closed-form"
        threshold = yaml.safe_load(Path(stage.config).read_text())["trainer"]["strategy"]["init_args"][
            "threshold"
        ]
        assert threshold == {"coarse": 3e-5, "geometry": 5e-5, "texture": 3e-5}[stage.name]
    coarse, geometry, texture = models["coarse"].scene, models["geometry"].scene, models["texture"].scene
    assert (geometry.stage, texture.stage) == ("geometry", "texture")
    assert [models[n].distillation_config.method for n in ("coarse", "geometry", "texture")] == [
        "vsd",
        "sds",
        "vsd",
    ]
    geometry.texture.inherit(coarse.geometry)  # raises if the texture field differs from the coarse field
    torch.testing.assert_close(
        geometry.texture.feature_network.state_dict(), coarse.geometry.feature_network.state_dict()
    )
    texture.init_from(geometry)  # raises if the grids differ
    assert torch.equal(texture.geometry.sdf, geometry.geometry.sdf)


def test_a_resumed_vsd_run_continues_its_rank_local_particle_exactly(runs, tmp_path):
    """The particle's own optimizer (rank-local: stepped by the module, not by Lightning) is in the checkpoint: a
    run stopped at step 2 and resumed to step 4 ends where the uninterrupted run does."""
    run_dir = one_thread_fit("prolificdreamer-coarse", tmp_path / "vsd", "--trainer.max_steps=2")
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["particle_optimizer"]["state"]
    one_thread_fit(
        "prolificdreamer-coarse", run_dir, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")
    )
    assert_equal(final_state(run_dir), final_state(runs["vsd"]))
