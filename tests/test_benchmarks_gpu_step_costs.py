"""benchmarks/gpu_step_costs.py keeps working on CPU at tiny sizes (the CUDA path is the same code at full size)."""

import csv
import math

import pytest

from benchmarks import gpu_step_costs


def test_projection_model():
    # no overhead: the projection is the steps per round; overhead only lowers it
    assert gpu_step_costs.projected_speedup(1.0, 0.0, 0.0, 8, 8.0) == 8.0
    assert gpu_step_costs.projected_speedup(1.0, 0.01, 0.05, 8, 8.0) == pytest.approx(8 * 1.01 / 1.13)


def test_tiny_run_on_cpu(tmp_path):
    speedup_csv = tmp_path / "speedup.csv"
    speedup_csv.write_text(
        "recipe,setting,policy,P,T/rounds\ndreamfusion,base,paper,8,5.0\ndreamfusion,base,defaults,8,2.0\n"
    )
    args = ["--tiny", "--recipes", "dreamfusion-if", "dreamfusion-sd", "prolificdreamer-coarse", "zero123"]
    args += [
        "--state-size",
        "1000",
        "--repeat",
        "1",
        "--speedup-csv",
        str(speedup_csv),
        "--out",
        str(tmp_path),
    ]
    rows = gpu_step_costs.main(args)
    assert [r["recipe"] for r in rows] == [
        "dreamfusion-if",
        "dreamfusion-sd",
        "prolificdreamer-coarse",
        "zero123",
    ]
    with (tmp_path / "gpu_step_costs.csv").open() as file:
        assert tuple(next(csv.DictReader(file))) == gpu_step_costs.COLUMNS
    assert "projections" in (tmp_path / "gpu_step_costs.md").read_text()
    for row in rows:
        assert row["t_grad_ms"] > 0 and row["replay_ms_P8"] > 0 and row["D"] == 1000
        assert row["gather_source"].startswith("modelled")
        assert row["gather_ms_P8"] == pytest.approx(1e3 * 7 / 8 * 8 * 1000 * 4 / 25e9)
        assert 0 < row["projected_speedup_at_S=P"] < 8
    by_name = {r["recipe"]: r for r in rows}
    assert by_name["dreamfusion-if"]["S_measured_cpu"] == 5.0  # the paper policy's row, not the defaults'
    assert 0 < by_name["dreamfusion-if"]["projected_speedup_at_S_measured"] < 5
    assert math.isnan(by_name["zero123"]["S_measured_cpu"])
