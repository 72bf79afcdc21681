"""Lightning's own tests under PicardStrategy: run chosen ``tests_pytorch`` files twice (stock, and with every CPU
``"auto"``/``"ddp*"`` strategy replaced by ``PicardStrategy(window_size=2, threshold=0)``) and write a Markdown table.

Usage (outside CI: it needs a Lightning checkout of the pinned version, lightning==2.6.6)::

    python benchmarks/lightning_conformance.py /path/to/pytorch-lightning --out conformance.md \\
        tests_pytorch/loops/test_training_loop.py tests_pytorch/trainer/logging_/test_train_loop_logging.py

The Picard run forces one CPU thread per process and the fork start method for more than one device. A test
that passes stock and fails under Picard is listed with the first line of its failure. ``--without-round-metrics``
forces ``log_round_metrics=False`` as well, so that tests asserting the exact set of logged keys see the stock keys.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

DEFAULT_FILES = (
    "tests_pytorch/loops/test_training_loop.py",
    "tests_pytorch/loops/test_training_epoch_loop.py",
    "tests_pytorch/loops/test_progress.py",
    "tests_pytorch/trainer/logging_/test_train_loop_logging.py",
    "tests_pytorch/trainer/logging_/test_distributed_logging.py",
    "tests_pytorch/callbacks/test_lr_monitor.py",
    "tests_pytorch/callbacks/test_early_stopping.py",
    "tests_pytorch/checkpointing/test_model_checkpoint.py",
    "tests_pytorch/trainer/test_dataloaders.py",
    "tests_pytorch/strategies/test_ddp_integration.py",
)

PLUGIN = '''
"""pytest plugin: every CPU "auto"/"ddp*" strategy of lightning.pytorch.Trainer becomes PicardStrategy."""
import os

import torch
import lightning.pytorch as pl
import lightning_picard

torch.set_num_threads(1)
_init = pl.Trainer.__init__


def _picard_init(self, *args, **kwargs):
    strategy = kwargs.get("strategy", "auto")
    accelerator = kwargs.get("accelerator", "auto")
    if isinstance(strategy, str) and (strategy == "auto" or strategy.startswith("ddp")) and accelerator in (
        "auto", "cpu"
    ):
        devices = kwargs.get("devices", "auto")
        count = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else 1)
        kwargs["strategy"] = lightning_picard.PicardStrategy(
            window_size=2,
            threshold=0.0,
            start_method="fork" if count > 1 else "popen",
            log_round_metrics=os.environ.get("PICARD_ROUND_METRICS", "1") == "1",
        )
        kwargs["accelerator"] = "cpu"
    _init(self, *args, **kwargs)


pl.Trainer.__init__ = _picard_init
'''


def run(
    checkout: Path,
    files: list[str],
    picard: bool,
    timeout: float,
    workdir: Path,
    round_metrics: bool = True,
) -> dict[str, str]:
    """Run each of ``files`` with pytest in ``checkout/tests``; returns test id → "passed" / "failed: …" /
    "skipped", and file → "timeout" for a file that did not finish within ``timeout`` seconds.
    ``round_metrics``: the forced strategy logs its ``picard/*`` metrics (``log_round_metrics``)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(workdir)]),
        "PICARD_ROUND_METRICS": "1" if round_metrics else "0",
    }
    (workdir / "picard_force.py").write_text(PLUGIN)
    outcomes: dict[str, str] = {}
    for index, file in enumerate(files):
        report = workdir / f"{'picard' if picard else 'stock'}-{index}.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            file,
        ]
        if picard:
            command[3:3] = ["-p", "picard_force"]
        try:
            subprocess.run(command, cwd=checkout / "tests", env=env, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            outcomes[file] = "timeout"
            continue
        if report.exists():
            outcomes.update(_outcomes(report))
    return outcomes


def _outcomes(report: Path) -> dict[str, str]:
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").removeprefix("tests.").replace(".", "/")
        name = f"{module}.py::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            message = (failure.get("message") or failure.text or "").strip().splitlines()
            outcomes[name] = "failed: " + (message[0][:160] if message else "")
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def table(
    stock: dict[str, str],
    picard: dict[str, str],
    files: list[str],
    version: str,
    tests: str,
    without_round_metrics: bool = False,
) -> str:
    flag = " --without-round-metrics" if without_round_metrics else ""
    lines = [
        f"Lightning {tests}'s tests against the installed lightning {version}, measured "
        f"{datetime.date.today().isoformat()} (`python benchmarks/lightning_conformance.py{flag}`):",
        "",
        "| file | stock passed | Picard passed | passing stock, failing under Picard |",
        "|---|---|---|---|",
    ]
    regressions = []
    for file in files:
        stem = file.removesuffix(".py")
        in_file = [name for name in stock if name.startswith(f"{stem}.py")]
        stock_passed = [n for n in in_file if stock[n] == "passed"]
        picard_passed = [n for n in stock_passed if picard.get(n) == "passed"]
        lost = [n for n in stock_passed if picard.get(n) != "passed"]
        regressions += [(n, picard.get(n, "not run (timeout)")) for n in lost]
        if stock.get(file) == "timeout" or picard.get(file) == "timeout":
            which = "stock" if stock.get(file) == "timeout" else "Picard"
            lines.append(f"| `{file}` | {len(stock_passed)} | {which} run timed out | |")
            continue
        if not in_file or all(stock[n].startswith("failed") for n in in_file):
            lines.append(f"| `{file}` | not collected (a test dependency is missing) | | |")
            continue
        lines.append(f"| `{file}` | {len(stock_passed)} | {len(picard_passed)} | {len(lost)} |")
    lines += ["", "Failing under Picard (passing stock):", ""]
    lines += [f"- `{name}`: {outcome}" for name, outcome in regressions] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkout", type=Path, help="a Lightning checkout (with tests/tests_pytorch)")
    parser.add_argument(
        "files", nargs="*", default=list(DEFAULT_FILES), help="test files, relative to tests/"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the Markdown table here (default: print)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per file and run")
    parser.add_argument("--tests-version", default="the checkout", help="the checkout's tag, for the table")
    parser.add_argument(
        "--without-round-metrics",
        action="store_true",
        help="force PicardStrategy(log_round_metrics=False): the logged keys are then the stock run's",
    )
    args = parser.parse_intermixed_args()
    import lightning

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        stock = run(args.checkout, args.files, picard=False, timeout=args.timeout, workdir=workdir)
        picard = run(
            args.checkout,
            args.files,
            picard=True,
            timeout=args.timeout,
            workdir=workdir,
            round_metrics=not args.without_round_metrics,
        )
    text = table(
        stock, picard, args.files, lightning.__version__, args.tests_version, args.without_round_metrics
    )
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
