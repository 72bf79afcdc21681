"""Two nodes on localhost through Lightning's cluster environments, exact at threshold 0.

Each "node" is started the way its launcher starts it: ``python script.py`` with ``NODE_RANK``
(LightningEnvironment), ``torchrun --nnodes 2 --node_rank i`` (TorchElasticEnvironment), or with the
variables ``srun`` exports (SLURMEnvironment, simulated: no SLURM is installed here).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_picard as lp
from tests.toy import (
    LAUNCH_ENVIRONMENT,
    ToyRegression,
    final_parameters,
    quiet_trainer_kwargs,
    regression_data,
)

SCRIPT = Path(__file__).parent / "scripts" / "picard_node.py"
ROOT = Path(__file__).parents[1]
STEPS = 12  # as in the script
TIMEOUT_S = 120.0
GRACE_S = 30.0

pytestmark = pytest.mark.multiprocess


def _sequential(steps: int) -> torch.Tensor:
    """The StepSeed sequential run, on one thread like every node (CPU bit-exactness needs equal thread counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = ToyRegression()
        trainer = pl.Trainer(
            devices=1,
            max_steps=steps,
            gradient_clip_val=0.5,
            callbacks=[lp.StepSeed(0)],
            **quiet_trainer_kwargs(),
        )
        trainer.fit(module, regression_data())
    finally:
        torch.set_num_threads(threads)
    return final_parameters(module)


@pytest.fixture(scope="module")
def sequential_reference() -> torch.Tensor:
    return _sequential(STEPS)


def _free_port(low: int = 20000, high: int = 30000) -> int:
    """A port in ``[low, high)`` that nothing listens on now."""
    for port in range(low + os.getpid() % (high - low), high):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def _clean_environment() -> dict[str, str]:
    """This process's environment without any launcher's or scheduler's variables, with one CPU thread."""
    scheduler = ("SLURM_", "TORCHELASTIC_", "PET_")
    launcher = {*LAUNCH_ENVIRONMENT, "GROUP_RANK", "LOCAL_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(scheduler)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _plain(node: int, port: int, program: list[str], output: Path) -> tuple[list[str], dict[str, str]]:
    env = {
        **_clean_environment(),
        "NODE_RANK": str(node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return _python(program), env


def _torchrun(node: int, port: int, program: list[str], output: Path) -> tuple[list[str], dict[str, str]]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    if not program[0].endswith(".py"):
        launcher.append("--no-python")
    return [*launcher, *program], _clean_environment()


def _srun(node: int, port: int, program: list[str], output: Path) -> tuple[list[str], dict[str, str]]:
    """What ``srun`` exports to task ``node`` of ``sbatch --nodes 2 --ntasks-per-node 1`` (SLURMEnvironment reads
    these). No MASTER_ADDR/MASTER_PORT: Lightning derives them from the node list and the job id, as on a cluster.
    ``scontrol`` (Lightning's requeue command) is a stand-in that appends its arguments to ``output/scontrol.log``."""
    bin_dir = output / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {output / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = _clean_environment()
    env.update(
        {
            "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
            "SLURM_JOB_ID": f"77{port - 15000:04d}",  # SLURMEnvironment's port: 15000 + the job id's last 4 digits
            "SLURM_JOB_NAME": "picard-multinode",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_PROCID": str(node),
            "SLURM_NODEID": str(node),
            "SLURM_LOCALID": "0",
        }
    )
    return _python(program), env


def _python(program: list[str]) -> list[str]:
    """A script runs with this interpreter; a console script runs as it is."""
    return [sys.executable, *program] if program[0].endswith(".py") else program


LAUNCHERS = {"LightningEnvironment": _plain, "TorchElasticEnvironment": _torchrun}


def _run_nodes(launcher, output: Path, program: list[str]) -> list[tuple[int, str]]:
    """Start ``program`` on both nodes, wait for both, return each node's ``(returncode, output)``.

    When one node fails, the other gets ``GRACE_S`` to stop on its own (less than the collectives' timeout, so a
    node left waiting in a collective is caught); whatever still runs then, or after ``TIMEOUT_S``, is killed.
    """
    port = _free_port(15000, 25000) if launcher is _srun else _free_port()
    processes = []
    with contextlib.ExitStack() as stack:
        logs = [
            stack.enter_context(open(output / f"node{node}.log", "w+")) for node in (0, 1)
        ]  # a pipe could fill
        try:
            for node, log in enumerate(logs):
                command, env = launcher(node, port, program, output)
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait(processes, time.monotonic() + TIMEOUT_S, stop_on_failure=True)
            if any(p.returncode for p in processes if p.poll() is not None):
                _wait(processes, time.monotonic() + GRACE_S, stop_on_failure=False)
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(
                        process.pid, signal.SIGKILL
                    )  # its session: torchrun's or Lightning's children too
                process.wait()
        results = []
        for process, log in zip(processes, logs):
            log.seek(0)
            results.append((process.returncode, log.read()))
    return results


def _wait(processes: list[subprocess.Popen], deadline: float, stop_on_failure: bool) -> None:
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if stop_on_failure and any(p.poll() not in (None, 0) for p in processes):
            return
        time.sleep(0.1)


def _describe(results: list[tuple[int, str]]) -> str:
    return "\n".join(f"--- node {i}, exit code {rc}:\n{text[-3000:]}" for i, (rc, text) in enumerate(results))


def _check_two_nodes(
    results: list[tuple[int, str]], output: Path, environment: str, expected: torch.Tensor
) -> None:
    assert [rc for rc, _ in results] == [0, 0], _describe(results)
    ranks = [torch.load(output / f"rank{rank}.pt") for rank in (0, 1)]
    for rank, result in enumerate(ranks):
        assert result["environment"] == environment
        assert (result["global_rank"], result["node_rank"], result["local_rank"]) == (rank, rank, 0)
        assert (result["world_size"], result["global_step"], result["threads"]) == (2, STEPS, 1)
        assert torch.equal(result["parameters"], expected), f"rank {rank} differs from sequential"
    first, second = (set(result["evaluated_steps"]) for result in ranks)
    assert first | second == set(range(STEPS))
    assert 0 in first and 0 not in second, "slot 0 (step τ) belongs to global rank 0, never to node 1's rank"
    assert second, "node 1 evaluated no step"
    # At threshold 0, gradients in the wrong rows still give the sequential result (the guesses they produce are
    # never accepted) at one step per round: several steps per round need node 1's gradients in the right rows.
    assert ranks[0]["rounds"] == ranks[1]["rounds"] < STEPS


@pytest.mark.parametrize("environment", list(LAUNCHERS))
def test_two_nodes_are_bit_identical_to_sequential(environment, sequential_reference, tmp_path):
    results = _run_nodes(LAUNCHERS[environment], tmp_path, [str(SCRIPT), str(tmp_path)])
    _check_two_nodes(results, tmp_path, environment, sequential_reference)


def test_two_slurm_nodes_are_exact_and_requeue_from_a_sequential_state(sequential_reference, tmp_path):
    """srun's variables; SLURM's requeue signal (SIGUSR1) reaches both ranks in the middle of a round.

    Lightning's handler writes ``hpc_ckpt_1.ckpt`` and calls ``scontrol requeue``; Picard holds the signal until the
    next round starts, so the checkpoint is the sequential state at its step and resuming from it is exact.
    """
    results = _run_nodes(_srun, tmp_path, [str(SCRIPT), str(tmp_path), "--signal-at", "6"])
    _check_two_nodes(results, tmp_path, "SLURMEnvironment", sequential_reference)
    assert re.fullmatch(r"requeue 77\d{4}\n", (tmp_path / "scontrol.log").read_text()), (
        "rank 0 requeues, once"
    )
    assert [path.name for path in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    checkpoint = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    step = checkpoint["global_step"]
    assert 3 < step < STEPS
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == step
    saved = ToyRegression()
    saved.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(final_parameters(saved), _sequential(step)), (
        "the requeue checkpoint is no sequential state"
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = ToyRegression()
        trainer = pl.Trainer(
            devices=1,
            max_steps=STEPS,
            gradient_clip_val=0.5,
            strategy=lp.PicardStrategy(window_size=4, threshold=0.0),
            **quiet_trainer_kwargs(),
        )
        trainer.fit(resumed, regression_data(), ckpt_path=tmp_path / "hpc_ckpt_1.ckpt")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(final_parameters(resumed), sequential_reference)


@pytest.mark.slow  # keeps the default tier of this file under 40 s on the 2-core machine
def test_a_failure_on_one_node_stops_both_with_the_named_error(tmp_path):
    """Node 1 raises in training_step: node 0 learns of it at the round's gather, not at the collective timeout."""
    results = _run_nodes(_plain, tmp_path, [str(SCRIPT), str(tmp_path), "--fail-at", "5"])
    assert all(rc not in (0, None) for rc, _ in results), _describe(results)
    assert "ValueError: bad render on the last node" in results[1][1], _describe(results)
    assert "PicardRankError: Picard: rank 1 failed while evaluating step" in results[0][1], _describe(results)
    assert not list(tmp_path.glob("rank*.pt"))


@pytest.mark.slow
def test_two_nodes_of_two_processes_launched_by_lightning(sequential_reference, tmp_path):
    """``python script.py`` on each node; Lightning starts the second process of each node itself."""
    results = _run_nodes(
        _plain, tmp_path, [str(SCRIPT), str(tmp_path), "--devices", "2", "--window-size", "6"]
    )
    assert [rc for rc, _ in results] == [0, 0], _describe(results)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(4)]
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    for rank, result in enumerate(ranks):
        assert torch.equal(result["parameters"], sequential_reference), f"rank {rank} differs from sequential"
    evaluated = [set(result["evaluated_steps"]) for result in ranks]
    assert set().union(*evaluated) == set(range(STEPS))
    assert all(evaluated) and all(0 not in steps for steps in evaluated[1:])


@pytest.mark.slow
def test_slot_groups_of_one_node_each_are_exact_across_two_torchrun_nodes(sequential_reference, tmp_path):
    """2 nodes × 2 processes, slot_group_size 2: each node is a slot group (its in-group all-reduce stays on the node),
    the window's gather crosses the nodes. The toy module takes the whole batch on both members, so their average is
    the step's gradient exactly: bit-identical to the sequential run."""
    program = [str(SCRIPT), str(tmp_path), "--devices", "2", "--window-size", "4", "--slot-group-size", "2"]
    results = _run_nodes(_torchrun_two_processes, tmp_path, program)
    assert [rc for rc, _ in results] == [0, 0], _describe(results)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(4)]
    for rank, result in enumerate(ranks):
        assert torch.equal(result["parameters"], sequential_reference), f"rank {rank} differs from sequential"
    evaluated = [set(result["evaluated_steps"]) for result in ranks]
    assert evaluated[0] == evaluated[1] and evaluated[2] == evaluated[3], (
        "a group's members evaluate the same slots"
    )
    assert evaluated[0] | evaluated[2] == set(range(STEPS)) and 0 not in evaluated[2]


def _torchrun_two_processes(
    node: int, port: int, program: list[str], output: Path
) -> tuple[list[str], dict[str, str]]:
    command, environment = _torchrun(node, port, program, output)
    command[command.index("--nproc-per-node") + 1] = "2"
    return command, environment


@pytest.mark.slow
def test_the_recipe_command_on_two_torchrun_nodes_matches_the_sequential_run(tmp_path):
    """The documented ``torchrun … --no-python lightning-picard fit`` command, with the CPU smoke config."""
    command = Path(sys.executable).parent / "lightning-picard"
    if not command.exists():
        pytest.skip("the lightning-picard console script is not installed next to this interpreter")
    fit = [str(command), "fit", "-c", str(ROOT / "recipes" / "configs" / "smoke" / "dreamgaussian.yaml")]
    picard = [*fit, "--trainer.num_nodes=2", "--trainer.devices=1", f"--run_dir={tmp_path / 'picard'}"]
    picard += ["--trainer.strategy=lightning_picard.PicardStrategy", "--trainer.strategy.window_size=4"]
    picard += ["--trainer.strategy.threshold=0"]
    results = _run_nodes(_torchrun, tmp_path, picard)
    assert [rc for rc, _ in results] == [0, 0], _describe(results)
    sequential = subprocess.run(
        [*fit, "--trainer.strategy=auto", "--run_dir", str(tmp_path / "sequential")],
        env=_clean_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    expected, actual = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
        for run in ("sequential", "picard")
    )
    assert actual["global_step"] == expected["global_step"] == 6
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], value), name
