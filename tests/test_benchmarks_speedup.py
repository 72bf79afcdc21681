"""benchmarks/speedup.py keeps working: DreamGaussian's demo config, P = 2, a few steps, both tables and the plot."""

import csv
import math

import pytest

from benchmarks import speedup


def tiny_run(out, *policies: str) -> list[dict]:
    """speedup.py on DreamGaussian's demo config, P = 2, 4 steps, no harder setting, with ``policies``."""
    args = [
        "--recipes",
        "dreamgaussian",
        "--windows",
        "2",
        "--harder-windows",
        "--steps",
        "4",
        "--out",
        str(out),
    ]
    return speedup.main([*args, *policies])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedup")
    rows = tiny_run(out, "--policies", "defaults", "exact")
    return out, rows


def test_table_has_every_column_and_row(result):
    out, rows = result
    assert [(r["policy"], r["P"]) for r in rows] == [
        ("sequential", 1),
        ("sequential seed 1", 1),
        ("defaults", 2),
        ("exact", 2),
    ]
    with (out / "speedup.csv").open() as file:
        table = list(csv.DictReader(file))
    assert tuple(table[0]) == speedup.COLUMNS
    assert len(table) == 4
    assert (out / "speedup.md").read_text().splitlines()[0].count("|") == len(speedup.COLUMNS) + 1
    assert (out / "speedup.png").stat().st_size > 1000


def test_values_are_sane(result):
    _, rows = result
    sequential, seed1, default, exact = rows
    assert sequential["rounds"] == sequential["evaluations"] == 4
    for run in (default, exact):
        assert run["T"] == 4
        assert 1.0 <= run["T/rounds"] <= 2.0  # at most P steps per round
        assert run["rounds"] <= run["evaluations"] <= 2 * run["rounds"]  # at most P evaluations per round
        assert 10.0 < run["psnr"] < 40.0
        assert math.isfinite(run["fidelity_renders"]) and run["fidelity_renders"] >= 0.0
        assert math.isfinite(run["fidelity_params"])  # no densification in 4 steps: the shapes agree
        assert run["fidelity"] == run["fidelity_renders"]  # but Gaussians are compared by their renders
    assert default["threshold_first"] == default["threshold_last"] == 0.1  # the default tolerance, fixed
    assert sequential["psnr"] != seed1["psnr"]  # another seed is another run: the yardstick is not zero
    # tolerance 0 is the sequential run bit for bit: every measure must say so
    assert exact["fidelity_params"] == 0.0 and exact["fidelity_renders"] == 0.0
    assert exact["psnr"] == sequential["psnr"] and exact["rounds"] == 4


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    rows = tiny_run(out, "--policies", "paper", "--tolerances", "0", "0.1", "10")
    return out, rows


def test_tolerance_sweep_has_a_row_per_tolerance(frontier):
    out, rows = frontier
    assert [r["policy"] for r in rows] == [
        "sequential",
        "sequential seed 1",
        "paper",
        "tolerance=0",
        "tolerance=0.1",
        "tolerance=10",
    ]
    with (out / "speedup.csv").open() as file:
        table = list(csv.DictReader(file))
    assert tuple(table[0]) == speedup.FRONTIER_COLUMNS
    assert [r["policy"] for r in table] == [r["policy"] for r in rows]
    assert (out / "speedup.md").read_text().splitlines()[0].count("|") == len(speedup.FRONTIER_COLUMNS) + 1
    assert (out / "frontier.png").stat().st_size > 1000


def test_tolerance_sweep_values(frontier):
    _, rows = frontier
    by_policy = {r["policy"]: r for r in rows}
    for tolerance in (0.0, 0.1, 10.0):
        run = by_policy[speedup.tolerance_policy(tolerance)]
        assert run["threshold_first"] == run["threshold_last"] == tolerance  # the strategy got this tolerance
        strides = [int(s) for s in run["strides"].split()]
        assert len(strides) == run["rounds"] and sum(strides) == run["T"] == 4
        assert all(1 <= s <= 2 for s in strides)  # at most P steps per round
        assert math.isnan(run["late_T/rounds"]) or 1.0 <= run["late_T/rounds"] <= 2.0
    exact = by_policy["tolerance=0"]
    # tolerance 0 is the sequential run bit for bit: zero distance, one step per round
    assert exact["fidelity_params"] == 0.0 and exact["fidelity_renders"] == 0.0 and exact["fidelity"] == 0.0
    assert exact["strides"] == "1 1 1 1" and exact["T/rounds"] == 1.0
    assert (
        by_policy["tolerance=10"]["T/rounds"] > 1.0
    )  # ten squared steps accepts copies: fewer rounds than steps
    assert by_policy["tolerance=10"]["fidelity"] > 0.0


def test_policy_names_and_bad_tolerances(tmp_path):
    recipe = speedup.RECIPES["asd"]
    assert speedup.tolerance_policy(0.3) == "tolerance=0.3"
    assert speedup.policy_arguments("tolerance=0.3", recipe) == {"tolerance": 0.3}
    assert speedup.policy_arguments("exact", recipe) == {"tolerance": 0.0}
    with pytest.raises(ValueError, match="tolerance=t"):
        speedup.policy_arguments("loose", recipe)
    with pytest.raises(SystemExit):
        speedup.main(["--tolerances", "-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        speedup.main(["--tolerances", "1", "--wall-clock", "--out", str(tmp_path)])


def test_late_stride_is_the_mean_stride_of_the_second_half():
    # rounds start at steps 0 1 2 4 8 10 11: those at 6 or later are 8 (2 steps) and 10 (1); 11 is the last
    assert speedup.late_stride([1, 1, 2, 4, 2, 1, 1], 12) == 1.5
    assert math.isnan(
        speedup.late_stride([1, 1, 2, 4, 2], 10)
    )  # only the last round starts in the second half


def test_replot_reads_the_table_back(frontier):
    out, rows = frontier
    (out / "frontier.png").unlink()
    again = speedup.main(["--replot", "--out", str(out)])
    assert (out / "frontier.png").stat().st_size > 1000
    for column in ("policy", "P", "T/rounds", "fidelity", "strides", "psnr_within_seed_spread"):
        assert [repr(r[column]) for r in again] == [repr(r[column]) for r in rows]  # repr: NaN is not == NaN
