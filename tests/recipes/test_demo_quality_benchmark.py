"""benchmarks/demo_quality.py keeps working: a few steps of the recommended setting, densification included."""

from __future__ import annotations

import math

from benchmarks.demo_quality import RECOMMENDED, SETTINGS, derive, run, with_overrides


def test_recommended_setting_runs_densifies_and_is_deterministic():
    tiny = derive(RECOMMENDED, gaussians=dict(num_points=40), densify=dict(end_step=4, interval=2))
    tiny = with_overrides(tiny, ["densify.grad_threshold=0.0"])  # every Gaussian qualifies
    first = run(tiny, steps=4, seed=0, eval_every=2)
    assert [r["step"] for r in first] == [0, 2, 4]
    assert first[-1]["n"] > 40  # densified through the real DensificationSchedule
    assert all(math.isfinite(r["psnr"]) and r["cpu_s"] >= 0 for r in first)
    again = run(tiny, steps=4, seed=0, eval_every=2)
    assert [r["psnr"] for r in again] == [r["psnr"] for r in first]
    assert set(SETTINGS) >= {"baseline", "recommended", "recommended_photo"}
