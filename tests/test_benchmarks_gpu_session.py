"""benchmarks/gpu_session.py: the one-call GPU lease script, checked on CPU at toy sizes (its steps, time limits,
partial output and the files it brings back)."""

import json
import sys
import time

import pytest

from benchmarks import gpu_session


def test_a_step_past_its_limit_is_stopped_and_keeps_its_output():
    step = gpu_session.Step(
        "sleeper", (sys.executable, "-c", "import time; print('half done', flush=True); time.sleep(60)"), 2
    )
    start = time.monotonic()
    status, seconds, output = gpu_session.run_step(step, {}, deadline=time.monotonic() + 100)
    assert time.monotonic() - start < 30
    assert status == "stopped after its limit of 2 s"
    assert "half done" in output
    assert seconds >= 2


def test_the_session_deadline_cuts_a_step_short_or_skips_it():
    step = gpu_session.Step("quick", (sys.executable, "-c", "print('ran')"), 100)
    assert (
        gpu_session.run_step(step, {}, deadline=time.monotonic() + 5)[0]
        == "not run: the session's time was spent"
    )
    status, _, output = gpu_session.run_step(step, {}, deadline=time.monotonic() + 60)
    assert (status, output.strip()) == ("passed", "ran")
    failing = gpu_session.Step("failing", (sys.executable, "-c", "raise SystemExit(3)"), 100)
    assert gpu_session.run_step(failing, {}, deadline=time.monotonic() + 60)[0] == "failed (exit 3)"


def test_no_wheels_means_the_installed_packages(tmp_path):
    message, into_site = gpu_session.install_wheels(tmp_path / "absent", tmp_path / "site")
    assert not into_site
    assert "no wheels" in message


def test_the_steps_fit_the_device_limits(tmp_path):
    steps = gpu_session.steps(tmp_path, tiny=False)
    assert [s.name for s in steps] == [
        "environment",
        "batched-denoiser",
        "step-costs",
        "batched-rounds",
        "gpu-tests",
    ]
    full = [arg for s in steps for arg in s.command]
    assert "--random-sd" in full and "cuda" in full
    assert "--tiny" not in full


def test_without_cuda_it_asks_for_tiny(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        gpu_session.main(["--out", "unused"])
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_session.main(["--tiny", "--only", "nonsense"])
    assert "unknown step" in capsys.readouterr().err


def test_tiny_session_brings_back_the_batched_slots_figures(tmp_path):
    out = tmp_path / "out"
    results = gpu_session.session(
        out, tiny=True, only=["batched-denoiser", "batched-rounds"], budget_s=400, wheels=tmp_path / "none"
    )
    assert [(name, status) for name, status, _ in results] == [
        ("batched-denoiser", "passed"),
        ("batched-rounds", "passed"),
    ]
    calls = json.loads((out / "batched_denoiser.json").read_text())
    assert [(c["config"], c["P"]) for c in calls] == [("dreamgaussian-smoke", 2)]
    assert calls[0]["separate_ms"] > 0 and calls[0]["together_ms"] > 0
    rounds = json.loads((out / "batched_rounds.json").read_text())
    assert [(r["config"], r["P"]) for r in rounds] == [("dreamgaussian-smoke", 2)]
    assert len(rounds[0]["one_by_one_ms"]) == len(rounds[0]["batched_ms"]) == 2
    report = (out / "session.md").read_text()
    assert "| batched-rounds | passed |" in report
    assert (
        "| config | P | sequential step (ms)" in report
    )  # the benchmark's own table, for docs/benchmarks.md
    # what comes back from the device: at most 8 plain files, none deeper than the output folder
    assert all(p.is_file() for p in out.iterdir()) and len(list(out.iterdir())) <= 8
