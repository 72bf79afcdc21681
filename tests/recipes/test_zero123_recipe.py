"""Zero-1-to-3 (image-to-3D) through the ``lightning-picard`` command line: smoke configs, the input image,
the weight-free prior conditioned on the input view and relative cameras, and Zero-1-to-3 loaded from a folder."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from test_recipe_cli import (  # noqa: F401  (the CLI's own checks, collected here on the zero123 smoke runs)
    SMOKE,
    final_state,
    fit,
    test_test_and_export_write_files_that_reopen,
    test_two_rank_picard_at_threshold_zero_equals_the_sequential_run_bit_for_bit,
)
from tiny_models import tiny_zero123_folder  # noqa: F401  (module-scoped fixture)

from recipes.cli import main
from recipes.data.procedural import default_procedural_object, spherical_cameras
from recipes.data.single_image import ReferenceViewConfig, SingleImageDataModule
from recipes.guidance.closed_form import ClosedFormPrior
from recipes.guidance.image_condition import ClosedFormImageEncoder, ImageCondition
from recipes.guidance.reference_view import reference_depth_loss
from recipes.system import GuidanceConfig, ImageTo3D, NeRFScene

RECIPES = ("zero123-nerf", "zero123-gaussians")


@pytest.fixture(scope="module", params=RECIPES)
def sequential_run(request, tmp_path_factory) -> tuple[str, Path]:
    """One thread, like each Picard process (CPU kernels round differently with another thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = fit(request.param, tmp_path_factory.mktemp(request.param) / "sequential")
    finally:
        torch.set_num_threads(threads)
    return request.param, run_dir


def test_a_smoke_run_fits_the_reference_view_and_writes_its_run_folder(sequential_run):
    recipe, run_dir = sequential_run
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "val").glob("*.png"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == info["rounds"] > 0 and info["strategy"] == "SingleDeviceStrategy"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss_sds", "train/loss_ref_rgb", "train/loss_ref_mask"):
        assert name in header.split(",")
    if recipe == "zero123-nerf":  # its depth weight ramps up from 0 at step 0
        assert "train/loss_ref_depth" in header.split(",")
    else:  # the Gaussians densify on the random view's statistics
        assert final_state(run_dir)["scene.gaussians.means"].shape[0] != 40


def test_a_missing_image_is_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass --data\.image") as error:
        fit("zero123-gaussians", tmp_path / "run", f"--data.image={tmp_path / 'nope.png'}")
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_an_rgb_image_needs_its_background_colour(tmp_path):
    rgb = np.full((16, 16, 3), 255, dtype=np.uint8)
    rgb[4:12, 4:12] = (200, 30, 30)
    iio.imwrite(tmp_path / "object.png", rgb)
    with pytest.raises(ValueError, match="no alpha channel and background removal is left to you") as error:
        fit("zero123-gaussians", tmp_path / "run", f"--data.image={tmp_path / 'object.png'}")
    assert "--data.background_color" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
    data = SingleImageDataModule(str(tmp_path / "object.png"), background_color=(1.0, 1.0, 1.0))
    mask = data.reference_image().rgba[..., 3]
    assert mask.sum() == 64 and mask[4:12, 4:12].all()


def test_the_procedural_image_is_the_objects_view_at_the_reference_camera():
    reference = ReferenceViewConfig(
        elevation_deg=20.0, camera_distance=3.0, fovy_deg=40.0, height=16, width=16
    )
    data = SingleImageDataModule("procedural", reference=reference)
    view = default_procedural_object().render(spherical_cameras([20.0], [0.0], height=16, width=16))
    assert torch.allclose(data.reference_image().on_white(), view.rgb, atol=1e-6)
    batch = data.train_dataset()[0]
    assert batch.depth is not None and (batch.depth[batch.mask > 0.99] > 2.0).all()


def test_the_closed_form_prior_sees_the_input_view_and_relative_cameras_only():
    """Locating the input view among the references, then asking at its pose + Δ, is the prior at the absolute
    pose; the training cameras' absolute pose never reaches it."""
    prior = ClosedFormPrior.from_procedural_object(height=16)
    image = default_procedural_object().render(spherical_cameras([50.0], [120.0], height=16, width=16)).rgb
    encoder = ClosedFormImageEncoder(prior)
    assert torch.allclose(encoder.encode_reference(image), torch.tensor([50.0, 120.0]), atol=1e-4)
    # the input view is at (50°, 120°) in the object's frame but the data says (20°, 0°): a frame rotation
    condition = ImageCondition(encoder, encoder.encode_reference(image), 20.0, 0.0, 3.0)
    cameras = spherical_cameras([-10.0, 20.0], [30.0, 270.0])
    assert torch.allclose(condition(cameras), torch.tensor([[20.0, 150.0], [50.0, 390.0]]), atol=1e-4)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 600])
    absolute = prior.predict_noise(x_t, t, torch.tensor([[20.0, 150.0], [50.0, 30.0]]))
    assert torch.allclose(prior.predict_noise(x_t, t, condition(cameras)), absolute, atol=1e-5)


def test_the_depth_loss_ignores_scale_and_shift():
    depth = torch.rand(1, 1, 8, 8) + 1.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    assert reference_depth_loss(depth, 3.0 * depth - 2.0, mask).item() == pytest.approx(0.0, abs=1e-10)
    flat = torch.ones_like(depth, requires_grad=True)
    loss = reference_depth_loss(flat, depth, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # a constant reference fits any render's mean
    assert reference_depth_loss(depth, depth.flip(-1), mask).item() > 0.0


def test_image_to_3d_refuses_a_text_guidance():
    with pytest.raises(ValueError, match="needs an image-conditioned guidance"):
        ImageTo3D(NeRFScene(), guidance=GuidanceConfig(model="stable-diffusion"))


def test_zero123_guidance_loads_from_a_local_folder(tiny_zero123_folder, tmp_path):  # noqa: F811
    """The real ``from_pretrained`` path on a tiny random Zero-1-to-3 saved to disk, through the CLI."""
    run_dir = fit(
        "zero123-nerf",
        tmp_path / "zero123",
        "--model.guidance.model=zero123",
        f"--model.guidance.pretrained_model_name_or_path={tiny_zero123_folder}",
        "--model.guidance.image_resolution=16",
        "--model.sds.guidance_scale=3.0",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    )
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 2
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    sds = header.split(",").index("train/loss_sds")
    assert all(float(row.split(",")[sds]) > 0 for row in rows if row.split(",")[sds])


def test_missing_zero123_weights_are_refused_before_anything_is_written(tmp_path):
    from recipes.guidance.loading import GuidanceModelNotFoundError

    with pytest.raises(GuidanceModelNotFoundError, match="no-model-here"):
        fit(
            "zero123-nerf",
            tmp_path / "run",
            "--model.guidance.model=zero123",
            f"--model.guidance.pretrained_model_name_or_path={tmp_path / 'no-model-here'}",
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["zero123-nerf", "zero123-gaussians"])
def test_the_paper_size_configs_parse_and_need_an_image(recipe, capsys):
    config = str(SMOKE.parent / f"{recipe}.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, "--data.image", "procedural", "--print_config"])
    printed = capsys.readouterr().out
    assert "model: zero123" in printed and "window_size: 7" in printed
    with pytest.raises(SystemExit):
        main(["fit", "-c", config])
    assert "image" in capsys.readouterr().err


def test_the_depth_loss_without_a_depth_map_is_refused(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (200, 30, 30, 255)
    iio.imwrite(tmp_path / "object.png", rgba)
    with pytest.raises(ValueError, match=r"input view has no depth; pass --data\.depth"):
        fit(
            "zero123-gaussians",
            tmp_path / "run",
            f"--data.image={tmp_path / 'object.png'}",
            "--model.reference_losses.depth=1.0",
        )
    assert not (tmp_path / "run").exists()
