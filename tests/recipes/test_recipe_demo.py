"""``lightning-picard demo`` at a tiny size: every run, the table, and the files it promises."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest

from recipes.demo import SUMMARY_KEYS, main

TINY = [
    "--steps",
    "4",
    "--model.init_args.scene.init_args.init.num_points=30",
    "--model.init_args.mesh_resolution=24",
    "--model.init_args.texture_size=32",
]


@pytest.mark.multiprocess
def test_the_demo_compares_sequential_picard_and_the_photometric_bound(tmp_path):
    summary = main(["--out", str(tmp_path / "demo"), *TINY])
    out = tmp_path / "demo"
    written = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= written.keys()
    assert written["steps"] == 4 and 1 <= written["rounds"] <= 4
    assert written["fidelity_ratio"] >= 0 and written["seed_render_distance"] > 0
    assert written["fidelity_floor"] >= 0, "the perturbed sequential run is measured"
    assert (out / "runs" / "perturbed" / "run.json").is_file()
    assert summary["sequential_psnr"] == written["sequential_psnr"]
    gif = iio.imread(out / "turntable_gt_sequential_picard.gif")
    assert gif.shape[0] == 36 and gif.shape[2] == 3 * gif.shape[1]  # ground truth | sequential | Picard
    assert (out / "convergence.png").stat().st_size > 0
    assert (out / "mesh.obj").is_file() and (out / "mesh.glb").is_file()
    assert (
        "fidelity ratio" in (out / "summary.md").read_text()
        and "fidelity floor" in (out / "summary.md").read_text()
    )
    with pytest.raises(FileExistsError, match="already holds a demo"):
        main(["--out", str(out), *TINY])
