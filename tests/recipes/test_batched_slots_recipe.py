"""``model.batched_slots``: a rank's Picard slots rendered each from its own guess and distilled through one denoiser
call, against the same run evaluated one slot at a time (smoke configs, window 4 on one rank, threshold 0).

Not bit for bit: the denoiser's batched call (the closed-form prior's mixture over references, a UNet) sums in
another order than a call per slot, so its outputs differ by a few ulps, which Adam's normalised steps carry into
the parameters. The tolerance is far below the distance between runs with different seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_recipe_cli import assert_close_but_for_adam_rounding, final_state, one_thread_fit
from tiny_models import tiny_sd_folder  # noqa: F401  (module-scoped fixture)

from recipes.cli import main

SMOKE = Path(__file__).parents[2] / "recipes" / "configs" / "smoke"
WINDOW_4_EXACT = [
    "--trainer.strategy=lightning_picard.PicardStrategy",
    "--trainer.strategy.window_size=4",
    "--trainer.strategy.threshold=0.0",
]


def assert_runs_close(batched: Path, one_by_one: Path, tolerance: float, steps: int) -> None:
    """Equal to ``tolerance`` but for Adam's rounding amplification (lr 0.01 in the smoke configs)."""
    ours, theirs = final_state(batched), final_state(one_by_one)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert_close_but_for_adam_rounding(
            ours[name], theirs[name], tolerance, lr=0.01, steps=steps, name=name
        )


@pytest.mark.parametrize(("recipe", "steps"), [("dreamgaussian", 4), ("dreamfusion", 3)])
def test_batched_slots_match_one_by_one(recipe, steps, tmp_path):
    overrides = [*WINDOW_4_EXACT, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
    one_by_one = one_thread_fit(recipe, tmp_path / "one-by-one", *overrides)
    batched = one_thread_fit(recipe, tmp_path / "batched", *overrides, "--model.batched_slots=true")
    assert_runs_close(batched, one_by_one, 1e-4, steps)
    if recipe == "dreamgaussian":  # through a densification, step outputs included
        assert final_state(batched)["scene.gaussians.means"].shape[0] != 40


def test_batched_slots_with_text_conditions_match_one_by_one(tiny_sd_folder, tmp_path):  # noqa: F811
    """Stable Diffusion: per-slot VAE encoding, the view-dependent text embeddings concatenated, CFG batched."""
    overrides = [
        *WINDOW_4_EXACT,
        "--model.guidance.model=stable-diffusion",
        f"--model.guidance.pretrained_model_name_or_path={tiny_sd_folder}",
        "--model.guidance.image_resolution=16",
        "--model.sds.guidance_scale=7.5",
        f"--model.prompt_options.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    ]
    one_by_one = one_thread_fit("dreamfusion", tmp_path / "one-by-one", *overrides)
    batched = one_thread_fit("dreamfusion", tmp_path / "batched", *overrides, "--model.batched_slots=true")
    assert_runs_close(batched, one_by_one, 1e-4, steps=2)


def test_batched_slots_refuse_other_distillations(tmp_path):
    with pytest.raises(ValueError, match="batched_slots batches SDS"):
        main(
            [
                "fit",
                "-c",
                str(SMOKE / "asd.yaml"),
                "--run_dir",
                str(tmp_path / "run"),
                "--model.batched_slots=true",
            ]
        )


def test_conditions_concatenate_along_the_batch():
    from recipes.data.cameras import Cameras
    from recipes.guidance.batching import concat_conditions
    from recipes.guidance.cfg import PerpNegCondition

    def cameras(azimuth: float) -> Cameras:
        one = torch.ones(1)
        return Cameras(torch.eye(4)[None], one, 8, 8, one * 10, one * azimuth, one * 3, torch.zeros(1, 3))

    joined = concat_conditions([cameras(0.0), cameras(90.0)])
    assert joined.azimuth_deg.tolist() == [0.0, 90.0] and len(joined) == 2
    assert concat_conditions([None, None]) is None
    text = concat_conditions([torch.zeros(1, 2, 3), torch.ones(2, 2, 3)])
    assert text.shape == (3, 2, 3)
    perp = concat_conditions(
        [PerpNegCondition(torch.zeros(1, 4), [torch.ones(1, 4)], torch.full((1, 1), -2.0)) for _ in range(2)]
    )
    assert (
        perp.positive.shape == (2, 4) and perp.negatives[0].shape == (2, 4) and perp.weights.shape == (2, 1)
    )
    with pytest.raises(TypeError, match="different kinds"):
        concat_conditions([None, torch.zeros(1)])
    with pytest.raises(ValueError, match="different image sizes"):
        Cameras.cat([cameras(0.0), cameras(0.0).with_resolution(4, 4)])
