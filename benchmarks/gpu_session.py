"""Every GPU measurement this project owes, in one call of a short device lease.

A lent GPU machine comes bare, for about 15 minutes of device time all tries together, one command of at most
10 minutes at a time, and at most 8 files back. This script is that command: it runs the GPU checks one after
another, each under its own time limit, keeps going when one fails, and writes everything into ``--out``:

=========================  ==========================================================================
``session.md``             what ran, how long, its exit status, and every step's output (the tables)
``environment.json``       device, driver, torch and the packages the steps used
``gpu_step_costs.csv/.md`` ``benchmarks/gpu_step_costs.py``: per-step guidance cost at the paper's sizes,
                           replay and all-gather at P = 8, the projected 8-GPU speedup
``batched_denoiser.json``  ``benchmarks/batched_slots.py --denoiser-only``: the guidance call of a round
``batched_rounds.json``    ``benchmarks/batched_slots.py``: whole rounds one by one and batched
=========================  ==========================================================================

The steps, in order of what matters most if time runs out (``--only`` picks some, ``--list`` shows them):
``environment``, ``batched-denoiser``, ``step-costs``, ``batched-rounds``, ``gpu-tests``.

Packages the GPU machine's image lacks (diffusers, jsonargparse and what they need) travel as wheels in ``.whl/``
(ignored by git). Here, where the package registry is reachable, once per machine::

    python benchmarks/gpu_session.py --fetch-wheels

then, through the device tool, with ``carry=[".whl"]`` and ``timeout_s=600``::

    python3 benchmarks/gpu_session.py --out $OUT

It installs the wheels into ``/tmp/site`` for its steps (nothing outside ``/tmp`` changes). On a CPU, ``--tiny``
runs the same steps at toy sizes (what the tests check); its figures measure nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "site"

# What the device machine's image lacks (the device tool's KINDS.md lists its packages: Python 3.12, torch,
# lightning, transformers, peft, torchmetrics are there); pinned to the versions this project is tested with.
MISSING_THERE = (
    "diffusers==0.42.1",
    "importlib_metadata==10.2.0",
    "lazy-importer==0.1.0",
    "jsonargparse==4.53.0",
    "docstring_parser==0.18.0",
    "typeshed_client==2.15.0",
)
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Step:
    """One measurement: a name for ``--only``, the command, and the seconds it may take."""

    name: str
    command: tuple[str, ...]
    limit_s: int


def steps(out: Path, tiny: bool) -> list[Step]:
    """The session's steps, most important first. ``tiny``: toy sizes on the CPU (checks the plumbing only)."""
    python = sys.executable
    batched = [python, str(ROOT / "benchmarks" / "batched_slots.py")]
    if tiny:
        batched_denoiser = [*batched, "--denoiser-only", "--repeats", "2", "--windows", "2"]
        batched_denoiser += ["--configs", "dreamgaussian-smoke"]
        batched_rounds = [*batched, "--windows", "2", "--steps", "4", "--warmup", "0"]
        batched_rounds += ["--configs", "dreamgaussian-smoke"]
        step_costs = [
            "--tiny",
            "--recipes",
            "dreamgaussian",
            "dreamfusion-sd",
            "--state-size",
            "1000",
            "--repeat",
            "1",
        ]
    else:
        random_sd = str(Path(tempfile.gettempdir()) / "random-sd21")
        cuda = ["--device", "cuda", "--random-sd", random_sd]
        batched_denoiser = [*batched, *cuda, "--denoiser-only", "--windows", "2", "4", "8"]
        batched_rounds = [
            *batched,
            *cuda,
            "--windows",
            "4",
            "--configs",
            "dreamgaussian-sd21",
            "dreamfusion-sd21",
        ]
        step_costs = []
    return [
        Step("environment", (python, str(Path(__file__).resolve()), "--environment", str(out)), 60),
        Step("batched-denoiser", (*batched_denoiser, "--json", str(out / "batched_denoiser.json")), 150),
        Step(
            "step-costs",
            (python, str(ROOT / "benchmarks" / "gpu_step_costs.py"), *step_costs, "--out", str(out)),
            200,
        ),
        Step("batched-rounds", (*batched_rounds, "--json", str(out / "batched_rounds.json")), 240),
        Step(
            "gpu-tests", (python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"), 120
        ),
    ]


def fetch_wheels(folder: Path = WHEELS) -> None:
    """Download the wheels the device image lacks (for its Python and platform, no dependencies) into ``folder``."""
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder)]
    subprocess.run([*command, *MISSING_THERE], check=True)
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}; carry it: run(..., carry=['.whl'])")


def install_wheels(folder: Path = WHEELS, site: Path = SITE) -> tuple[str, bool]:
    """Install the carried wheels into ``site`` (no index, no dependencies).

    Returns what happened, in words, and whether ``site`` now holds them (then the steps import from it first)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}: the steps use the packages already installed", False
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        failed = (
            f"installing {len(wheels)} wheels failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
        return failed, False
    return f"installed {len(wheels)} wheels into {site}: {', '.join(w.name for w in wheels)}", True


def write_environment(out: Path) -> None:
    """``environment.json``: the device, driver, torch, and the versions of the packages the steps import."""
    import importlib.metadata

    import torch

    packages = {}
    for name in ("torch", "lightning", "diffusers", "transformers", "peft", "jsonargparse", "numpy"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    smi = shutil.which("nvidia-smi")
    facts = {
        "date_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_cuda": torch.version.cuda,
        "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
        if smi
        else None,
        "packages": packages,
    }
    (out / "environment.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))


def run_step(step: Step, env: dict[str, str], deadline: float) -> tuple[str, float, str]:
    """Run one step until it ends or its limit (cut to the session's deadline) passes.

    Returns its status in words, its seconds and its output (stdout and stderr together)."""
    left = deadline - time.monotonic()
    if left < 10:
        return "not run: the session's time was spent", 0.0, ""
    limit = min(step.limit_s, left)
    start = time.monotonic()
    try:
        done = subprocess.run(step.command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as stopped:  # its output so far comes as bytes, even with text=True
        output = b"".join(part or b"" for part in (stopped.stdout, stopped.stderr))
        return (
            f"stopped after its limit of {limit:.0f} s",
            time.monotonic() - start,
            output.decode(errors="replace"),
        )
    status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return status, time.monotonic() - start, done.stdout + done.stderr


def session(
    out: Path, tiny: bool, only: Sequence[str] | None, budget_s: float, wheels: Path = WHEELS
) -> list[tuple[str, str, float]]:
    """Run the steps into ``out`` within ``budget_s`` seconds, with the packages of ``wheels`` installed first;
    write ``session.md``; return (step, status, seconds) per step run."""
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    deadline = began + budget_s
    installed, into_site = install_wheels(wheels)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONUNBUFFERED"] = "1"
    paths = (str(SITE) if into_site else "", str(ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    lines = [
        f"# GPU session, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC{' (tiny: CPU plumbing check)' if tiny else ''}",
        "",
        installed,
        "",
    ]
    results = []
    for step in steps(out, tiny):
        if only and step.name not in only:
            continue
        print(f"== {step.name}: {' '.join(step.command)}", flush=True)
        status, seconds, output = run_step(step, env, deadline)
        print(f"== {step.name}: {status}, {seconds:.0f} s", flush=True)
        results.append((step.name, status, seconds))
        lines += [f"## {step.name}: {status}, {seconds:.0f} s", "", "`" + " ".join(step.command) + "`", ""]
        lines += ["```", output.strip()[-20_000:], "```", ""]
        (out / "session.md").write_text("\n".join(lines))  # after every step: a lease can end at any moment
    summary = ["| step | status | seconds |", "|---|---|---:|"]
    summary += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in results]
    lines[4:4] = [*summary, "", f"whole session: {time.monotonic() - began:.0f} s", ""]
    (out / "session.md").write_text("\n".join(lines))
    print("\n".join(summary))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="the output folder ($OUT on the device machine)"
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the plumbing only")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (see --list)")
    parser.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds for all steps. Default is 540 (the limit is 600).",
    )
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels the device lacks")
    parser.add_argument("--environment", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels()
        return 0
    if args.environment is not None:
        write_environment(args.environment)
        return 0
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_session_"))
    if args.list:
        for step in steps(out, args.tiny):
            print(f"{step.name} ({step.limit_s} s): {' '.join(step.command)}")
        return 0
    known = {step.name for step in steps(out, args.tiny)}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown step(s) {unknown}; the steps are {sorted(known)}")
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "no CUDA device here: run it on the GPU machine, or add --tiny for the CPU plumbing check"
            )
    results = session(out, args.tiny, args.only, args.budget)
    return 0 if all(status == "passed" for _, status, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
