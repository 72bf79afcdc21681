"""Picard round overhead on CPU with 2 gloo ranks, and convergence on a toy regression.

Part 1 (two processes, gloo on 127.0.0.1, ``torch.set_num_threads(1)`` in each rank) measures per round:

- (a) ``PicardStrategy.gather_rows``: one all-gather of a ``[slots_per_rank, D + n_params]`` float32 buffer
  (the strategy's own method, called with a stand-in ``self`` that only has ``world_size``);
- (b) ``PicardWindow.run_round`` with ``torch.optim.Adam`` (default implementation, lr 1e-3) and
  ``apply_update = optimizer.step()`` (no Lightning hooks), including ``OptimizerSnapshot`` capture/restore.
  Two cases: every guess accepted (skip = P: P optimizer steps, no second replay) and the worst case, the
  last-but-one guess rejected (skip = P − 1: P + P − 1 optimizer steps and a snapshot restore), forced by
  putting a NaN into that guess before the round with an infinite (adaptive) threshold;
- (c) one gradient evaluation of a "realistic step": forward + backward of an MLP of 4 square
  ``Linear(w, w)`` layers with ReLU between them (w chosen so the MLP has D parameters), MSE loss, batch
  128 and batch 1024 rows of width w; and, independent of D, forward + backward of a tiny Stable Diffusion
  UNet (diffusers ``UNet2DConditionModel`` built from config, random weights, frozen: gradient to the
  latents only) at latent 4 × 32 × 32, batch 4, text embeddings [4, 77, 32], standing for one
  score-distillation step (the UNet is frozen guidance; the trained 3D parameters are the replay's D).

Medians over rounds after warm-up; each figure is the slower rank's median (both ranks run concurrently,
as in training). A single-process profile splits ``run_round`` into its parts (presence read, snapshot
capture, ``load_gradients`` copy, ``optimizer.step``, error difference and ``squared_norm`` (float32 norm
with an exact-zero guard), target copy, host read of the errors, snapshot restore), with measured
alternatives next to them (among them the float64 norm the library used before).

Part 2 (one process, ``PicardWindow`` driven directly as in ``tests/test_picard_core.py``) runs a toy
teacher–student MLP regression with minibatch SGD noise (the minibatch of step s is drawn by a generator
seeded with ``seed·1_000_003 + s``) and reports T/rounds and the final parameter RMS distance to the
sequential run, next to the RMS distance between two sequential runs with different minibatch seeds.

Run: ``.venv/bin/python benchmarks/overhead.py`` (full, ≈ 2 min on 2 cores) or ``--quick``;
``--no-unet`` leaves the UNet step out (it needs diffusers).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_picard.convergence import squared_norm
from lightning_picard.flat import FlatParameters
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.strategy import PicardStrategy
from lightning_picard.window import PicardWindow

WORLD = 2
BATCHES = (128, 1024)
EMA_DECAY = 0.9  # PicardStrategy's default γ
UNET_LATENT = (4, 4, 32, 32)  # batch 4, 4 latent channels, 32 × 32
UNET_TOKENS = (77, 32)  # text-encoder sequence length and cross-attention width


# ----------------------------------------------------------------------------------------------------------
# Helpers


def median_ms(
    fn: Callable[[], Any], reps: int, warmup: int = 1, before: Callable[[], Any] | None = None
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls after ``warmup`` calls.

    ``before`` (untimed) runs ahead of every call, e.g. a barrier or re-poisoning a guess.
    """
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mlp_width(numel: int) -> int:
    """Width w of a 4-layer square MLP (4·(w² + w) parameters) closest to ``numel`` parameters."""
    return round((-1 + math.sqrt(1 + numel)) / 2)


def make_mlp(numel: int) -> torch.nn.Sequential:
    """The "realistic step" model: 4 × Linear(w, w) with ReLU between, ≈ ``numel`` parameters."""
    w = mlp_width(numel)
    layers: list[torch.nn.Module] = []
    for i in range(4):
        layers.append(torch.nn.Linear(w, w))
        if i < 3:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def tiny_unet() -> torch.nn.Module:
    """Tiny Stable Diffusion UNet (diffusers' test-fixture shape, 1 layer per block), random weights, frozen."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=UNET_LATENT[-1],
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=UNET_TOKENS[1],
        norm_num_groups=32,
    )
    return unet.requires_grad_(False)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------
# Part 1: per-round overhead, 2 ranks


def _time_gradient(model: torch.nn.Module, width: int, batch: int, reps: int) -> float:
    """Median ms of one forward + backward of ``model`` on a random ``[batch, width]`` MSE regression."""
    x, y = torch.randn(batch, width), torch.randn(batch, width)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()

    return median_ms(forward_backward, reps, before=dist.barrier)


def _time_unet(reps: int) -> tuple[int, float]:
    """UNet parameter count and median ms of one score-distillation-like forward + backward.

    The UNet is frozen; the gradient flows to the noisy latents (in SDS it continues into the renderer),
    with an MSE against a fixed noise target.
    """
    torch.manual_seed(0)
    unet = tiny_unet()
    latents = torch.randn(UNET_LATENT, requires_grad=True)
    noise = torch.randn(UNET_LATENT)
    timesteps = torch.randint(20, 980, (UNET_LATENT[0],))
    text = torch.randn(UNET_LATENT[0], *UNET_TOKENS)

    def forward_backward() -> None:
        latents.grad = None
        eps = unet(latents, timesteps, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(eps, noise).backward()

    return sum(p.numel() for p in unet.parameters()), median_ms(forward_backward, reps, before=dist.barrier)


def _time_round(
    flat: FlatParameters,
    optimizer: torch.optim.Optimizer,
    P: int,
    row: Callable[[int], torch.Tensor],
    case: str,
    reps: int,
) -> float:
    """Median ms of ``run_round`` with all ``P`` guesses accepted (``case="accept"``) or skip = P − 1."""
    window = PicardWindow(flat, P, math.inf, EMA_DECAY, init="copy")
    snapshot = OptimizerSnapshot(optimizer)
    skips: list[int] = []

    def one_round() -> None:
        result = window.run_round(0, P, row, lambda j: optimizer.step(), snapshot)
        skips.append(result.skip)

    def prepare() -> None:
        dist.barrier()
        if case == "worst":
            window.guess(P - 1)[0] = math.nan  # the error of step τ+P-1 is NaN: skip = P - 1

    ms = median_ms(one_round, reps, before=prepare)
    expected = P if case == "accept" else P - 1
    if set(skips) != {expected}:
        raise RuntimeError(f"{case}: skips {sorted(set(skips))}, expected {expected}")
    return ms


def _overhead_worker(
    rank: int, port: int, sizes: list[int], windows: list[int], reps: int, unet: bool, queue: Any
) -> None:
    """One rank: time the gather, the round and the gradient evaluation for every size and window."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    gatherer = SimpleNamespace(world_size=WORLD)
    unet_params, unet_ms = _time_unet(max(3, reps // 2)) if unet else (0, math.nan)
    results: list[dict[str, Any]] = []
    for numel in sizes:
        torch.manual_seed(rank)
        model = make_mlp(numel)
        params = list(model.parameters())
        D = sum(p.numel() for p in params)
        w = mlp_width(numel)
        grad_ms = {b: _time_gradient(model, w, b, max(3, reps // 2)) for b in BATCHES}
        model.zero_grad(set_to_none=True)
        flat = FlatParameters(params)
        optimizer = torch.optim.Adam(params, lr=1e-3)
        fused = torch.optim.Adam(params, lr=1e-3, fused=True)  # for comparison only
        for opt in (optimizer, fused):  # one step so that Adam has its state, as mid-training
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for P in windows:
            slots = -(-P // WORLD)
            local = flat.new_rows(slots)
            local[:, :D].normal_()
            local[:, D:] = 1.0
            gather_ms = median_ms(
                partial(PicardStrategy.gather_rows, gatherer, local), reps, before=dist.barrier
            )
            gathered = PicardStrategy.gather_rows(gatherer, local)
            row = partial(_gathered_row, gathered, slots)
            results.append(
                {
                    "D": D,
                    "w": w,
                    "P": P,
                    "slots": slots,
                    "gather": gather_ms,
                    "accept": _time_round(flat, optimizer, P, row, "accept", reps),
                    "worst": _time_round(flat, optimizer, P, row, "worst", reps),
                    "fused": _time_round(flat, fused, P, row, "accept", reps),
                    **{f"grad{b}": grad_ms[b] for b in BATCHES},
                    "unet": unet_ms,
                    "unet_params": unet_params,
                }
            )
            del local, gathered, row
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = []
        for rows in zip(*everyone):
            merged.append(
                {k: max(r[k] for r in rows) if isinstance(rows[0][k], float) else rows[0][k] for k in rows[0]}
            )
        queue.put(merged)
    dist.barrier()
    dist.destroy_process_group()


def _gathered_row(gathered: torch.Tensor, slots: int, j: int) -> torch.Tensor:
    """Row of slot ``j`` in the gathered buffer (``PicardStrategy.gathered_row``)."""
    return gathered[(j % WORLD) * slots + j // WORLD]


def run_overhead(sizes: list[int], windows: list[int], reps: int, unet: bool) -> list[dict[str, Any]]:
    """Spawn the two gloo ranks and collect the slower rank's medians."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_overhead_worker, args=(free_port(), sizes, windows, reps, unet, queue), nprocs=WORLD, join=True)
    return queue.get()


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of part 1, then the UNet step's cost and (a+b)/c against it."""
    b0, b1 = BATCHES
    lines = [
        "| D (params) | MLP width | P | rows/rank | (a) gather ms | (b) round ms, skip=P | (b) round ms, skip=P−1 "
        f"| (c) grad ms, B={b0} | (c) grad ms, B={b1} | (a+b)/c B={b0} | (a+b)/c B={b1} "
        "| (a+b)/c UNet | (b) skip=P, Adam fused=True |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, acc, worst = r["gather"], r["accept"], r["worst"]
        cells = [f"{r['D']:,}", str(r["w"]), str(r["P"]), str(r["slots"])]
        cells += [f"{v:.2f}" for v in (a, acc, worst, r[f"grad{b0}"], r[f"grad{b1}"])]
        cells += [f"{(a + acc) / c:.2f} – {(a + worst) / c:.2f}" for c in (r[f"grad{b0}"], r[f"grad{b1}"])]
        cells.append(
            f"{(a + acc) / r['unet']:.2f} – {(a + worst) / r['unet']:.2f}" if r["unet_params"] else "–"
        )
        cells.append(f"{r['fused']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if rows and rows[0]["unet_params"]:
        lines += [
            "",
            f"(c) UNet step: tiny SD UNet, {rows[0]['unet_params']:,} parameters (frozen), latent "
            f"{'×'.join(map(str, UNET_LATENT))}, forward + backward to the latents: "
            f"{rows[0]['unet']:.2f} ms (slower rank's median).",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Profile of run_round's parts (one process)


def _profile_one(numel: int, reps: int) -> tuple[int, dict[str, float]]:
    """D and the per-call ms of each part of ``run_round`` for an MLP of ≈ ``numel`` parameters."""
    torch.manual_seed(0)
    model = make_mlp(numel)
    params = list(model.parameters())
    flat = FlatParameters(params)
    D = flat.numel
    optimizer = torch.optim.Adam(params, lr=1e-3)
    row = flat.new_rows(1)[0]
    row[:D].normal_()
    row[D:] = 1.0
    presence = flat.presence(row)
    flat.load_gradients(row, presence)
    optimizer.step()
    snapshot = OptimizerSnapshot(optimizer)
    target = flat.flat.detach().clone()
    scratch = torch.empty_like(flat.flat)
    errors = torch.zeros(8, dtype=torch.float64)
    scratch64 = torch.empty(D, dtype=torch.float64)
    state_copies = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    fused = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, fused=True)
    foreach = torch.optim.Adam(
        [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, foreach=True
    )
    for opt in (fused, foreach):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()

    def capture_restore() -> None:
        snapshot.capture()
        snapshot.restore()

    def error_assign() -> None:
        errors[0] = squared_norm(scratch)

    def error_aminmax_guard() -> None:
        low, high = torch.aminmax(scratch)
        norm = torch.linalg.vector_norm(scratch).to(torch.float64).square()
        floor = ((low != 0) | (high != 0)).to(torch.float64) * torch.finfo(torch.float64).tiny
        errors[0] = torch.maximum(norm, floor)

    def error_float64() -> None:
        errors[0] = torch.linalg.vector_norm(scratch, dtype=torch.float64).square()

    def copy_state() -> None:
        for p, s in state_copies.items():
            for k, v in optimizer.state[p].items():
                s[k].copy_(v)

    def norm64_preallocated() -> None:
        scratch64.copy_(scratch)
        errors[0] = torch.dot(scratch64, scratch64)

    def norm64_chunked() -> None:
        total = torch.zeros((), dtype=torch.float64)
        for chunk in scratch.split(1 << 16):
            total += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
        errors[0] = total

    parts: list[tuple[str, Callable[[], Any]]] = [
        ("per round: presence (host read of flags)", lambda: flat.presence(row)),
        ("per round: snapshot capture + restore", capture_restore),
        ("per round: errors .tolist() (host sync)", lambda: (errors / D).tolist()),
        ("per step: load_gradients copy", lambda: flat.load_gradients(row, presence)),
        ("per step: optimizer.step (Adam default)", optimizer.step),
        ("per step: sub into scratch", lambda: torch.sub(flat.flat, target, out=scratch)),
        ("per step: error norm (squared_norm: fp32 norm + zero guard)", error_assign),
        ("per step: target copy", lambda: target.copy_(flat.flat)),
        ("alt: Adam foreach=True step", foreach.step),
        ("alt: Adam fused=True step", fused.step),
        ("before: float64 vector_norm (fp64 copy)", error_float64),
        ("alt: float32 vector_norm alone (no guard)", lambda: torch.linalg.vector_norm(scratch).square()),
        ("alt: the guard's difference.any() alone", scratch.any),
        ("alt: fp32 norm + guard via aminmax", error_aminmax_guard),
        ("alt: fp64 norm via preallocated fp64 buffer", norm64_preallocated),
        ("alt: fp64 norm in 64k-element chunks", norm64_chunked),
        ("alt: bare copy_ of the Adam state tensors", copy_state),
    ]
    return D, {name: median_ms(fn, reps, warmup=2) for name, fn in parts}


def profile_parts(sizes: list[int], reps: int) -> str:
    """Markdown table: per-call time of each part of ``run_round`` (same calls), with measured alternatives."""
    torch.set_num_threads(1)
    columns = dict(_profile_one(numel, reps) for numel in sizes)
    names = list(next(iter(columns.values())))
    lines = [
        "| part (ms per call) | " + " | ".join(f"D = {D:,}" for D in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{columns[D][n]:.3f}" for D in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Part 2: convergence on a toy regression (one process)


class Regression:
    """Teacher–student MLP regression: 16 → 64 → 64 → 1 tanh student, minibatch noise seeded by step."""

    def __init__(self, n: int = 2048, batch: int = 32) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 16, generator=g)
        teacher = [torch.randn(16, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 5]
        self.y = torch.tanh(self.x @ teacher[0]) @ teacher[1] + 0.05 * torch.randn(n, 1, generator=g)
        self.batch = batch

    def student(self) -> torch.nn.Module:
        """The student with a fixed initialisation (the same for every run)."""
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(16, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 1),
        )

    def gradient(self, model: torch.nn.Module, step: int, seed: int) -> None:
        """Set ``.grad`` to the minibatch gradient of step ``step`` (indices from a per-step generator)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=g)
        model.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(self.x[idx]), self.y[idx]).backward()

    def loss(self, model: torch.nn.Module) -> float:
        """Full-data MSE."""
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(self.x), self.y).item()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=3e-3)


def sequential(task: Regression, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """Plain sequential training; returns the flat final parameters and the full-data loss."""
    model = task.student()
    optimizer = _optimizer(model)
    for s in range(steps):
        task.gradient(model, s, seed)
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), task.loss(model)


def picard(
    task: Regression, steps: int, window_size: int, threshold: float, init: str, adaptive: bool
) -> tuple[torch.Tensor, float, int, float]:
    """Picard training with ``PicardWindow`` (as ``tests/test_picard_core.py``).

    Returns the final parameters, the full-data loss, the number of rounds and the final threshold.
    ``adaptive=False`` switches the window's threshold adaptation off (``PicardWindow.adaptive``); the
    strategy itself always adapts a positive threshold.
    """
    model = task.student()
    optimizer = _optimizer(model)
    params = list(model.parameters())
    flat = FlatParameters(params)
    window = PicardWindow(flat, window_size, threshold, EMA_DECAY, init=init)  # type: ignore[arg-type]
    window.adaptive = adaptive
    snapshot = OptimizerSnapshot(optimizer)
    rows = flat.new_rows(window_size)
    tau = 0
    while tau < steps:
        n = min(window_size, steps - tau)
        for j in range(n):
            window.load(j)
            task.gradient(model, tau + j, seed=0)
            flat.write_gradients(rows[j])
        window.load(0)
        result = window.run_round(tau, n, lambda j: rows[j], lambda j: optimizer.step(), snapshot)
        tau += result.skip
    return flat.flat.detach().clone(), task.loss(model), window.rounds, window.threshold


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square distance between two flat parameter vectors."""
    return (a - b).square().mean().sqrt().item()


def convergence_table(steps: int, windows: list[int], thresholds: list[float]) -> str:
    """Markdown table of part 2, with the sequential yardstick in the header lines."""
    torch.set_num_threads(1)
    task = Regression()
    reference, ref_loss = sequential(task, steps, seed=0)
    other, other_loss = sequential(task, steps, seed=1)
    yardstick = rms(reference, other)
    D = reference.numel()
    lines = [
        f"T = {steps} steps, D = {D:,} parameters, Adam lr 3e-3, batch {task.batch} of 2048 points. "
        f"Sequential full-data MSE {ref_loss:.5f} (seed 0) / {other_loss:.5f} (seed 1); "
        f"**RMS distance between the two sequential runs: {yardstick:.3e}**.",
        "",
        "| P | init | threshold e₀ | adaptive: rounds | T/rounds | RMS dist to seq | dist / yardstick | MSE "
        "| final e | fixed: rounds | T/rounds | RMS dist to seq | dist / yardstick | MSE |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for P in windows:
        for init in ("copy", "extrapolate"):
            for e in thresholds:
                cells = [str(P), init, f"{e:.0e}"]
                for adaptive in (True, False):
                    params, loss, rounds, final = picard(task, steps, P, e, init, adaptive)
                    d = rms(params, reference)
                    cells += [
                        str(rounds),
                        f"{steps / rounds:.2f}",
                        f"{d:.2e}",
                        f"{d / yardstick:.3f}",
                        f"{loss:.5f}",
                    ]
                    if adaptive:
                        cells.append(f"{final:.1e}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------


def machine() -> str:
    """nproc, CPU model and torch version."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    return f"nproc {os.cpu_count()}, {model}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    """Parse arguments, run the parts, print markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="D = 1e5 and 1e6 only, 3 rounds, T = 120 (≈ 20 s)"
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--no-unet", action="store_true", help="leave out the tiny SD UNet step (c)")
    parser.add_argument("--skip-convergence", action="store_true")
    args = parser.parse_args()
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    windows = [2, 8]
    reps = 3 if args.quick else 11
    steps = 120 if args.quick else 400
    thresholds = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3]

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"Machine: {machine()}; load average at the start {load}; torch.set_num_threads(1) in every rank.\n"
    )
    started = time.perf_counter()
    if not args.skip_overhead:
        print("## Picard round overhead (CPU, 2 ranks)\n")
        print(overhead_table(run_overhead(sizes, windows, reps, not args.no_unet)))
        print("\n### run_round parts (one process)\n")
        print(profile_parts(sizes, reps=max(5, reps)))
        print()
    if not args.skip_convergence:
        print("## Convergence on a toy regression\n")
        print(convergence_table(steps, [4, 8], thresholds))
        print()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"Total wall time {time.perf_counter() - started:.0f} s; load average at the end {load}.")


if __name__ == "__main__":
    main()
