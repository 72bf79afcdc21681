"""Cost of one Picard round through ``Trainer.fit``, Lightning's dispatch included, against a sequential step.

The module has D parameters in four tensors and a training step that costs almost nothing (a weighted sum
and, with ``--work``, ``--work`` square matrix products of width 256 to stand for a model), so what is timed
is the plumbing: batch fetching, hooks, ``self.log``, the gather, the replay with Lightning's
``optimizer_step`` and its LR scheduler, the progress bookkeeping and the loggers' dispatch.

Runs, each ``--steps`` optimizer steps with a CSV logger (``log_every_n_steps=1``), one thread per process:

- ``sequential``: ``strategy="auto"`` with :class:`lightning_picard.StepSeed`;
- ``picard-1``: one process, window ``--window`` (every slot on this rank);
- ``picard-2``: two processes (``picard_fork``, gloo), window ``--window``.

Picard runs use ``threshold=inf`` (every guess is accepted: a round replays ``P`` steps and never replays
again), so a round is ``P`` steps. Timed between round ends (``at_round_end``) after ``--warmup`` of them; the
report gives the median time per optimizer step and per round, and the round's overhead: its time less the
gradient evaluations it contains (slots per rank × the sequential step's evaluation time, measured in the
same process by timing ``training_step`` + ``backward``).

Run: ``PYTHONPATH=<checkout> .venv/bin/python benchmarks/trainer_round.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lightning_picard import PicardStrategy, StepSeed, at_round_end


class _Steps(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4,), float(index % 7))


class CheapModule(pl.LightningModule):
    """D parameters in four tensors; the loss is a weighted sum plus optional matrix-product work."""

    def __init__(self, params: int, work: int) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(params // 4)) for _ in range(4))
        self.work = work
        self.register_buffer("matrix", torch.randn(256, 256) / 16)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = sum((w * (1 + batch[0, i])).square().mean() for i, w in enumerate(self.weights))
        x = self.matrix
        for _ in range(self.work):
            x = torch.tanh(x @ self.matrix)
        loss = loss + 1e-6 * x.mean() * self.weights[0][0]
        self.log("train/loss", loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.999)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _BatchTimes(pl.Callback):
    """Wall time at every round's end (every step of a sequential run), with the global step then (written by rank 0
    to ``path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if at_round_end(trainer):
            self.marks.append((time.perf_counter(), trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.marks))


def _run(name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = CheapModule(args.params, args.work)
    marks = out / f"{name}.json"
    callbacks: list[pl.Callback] = [_BatchTimes(marks)]
    if name == "sequential":
        strategy: Any = "auto"
        devices = 1
        callbacks.append(StepSeed(0))
    else:
        devices = int(name.split("-")[1])
        strategy = PicardStrategy(
            window_size=args.window,
            threshold=float("inf"),
            ema_decay=1.0,
            start_method="fork" if devices > 1 else "popen",
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=CSVLogger(out, name=name),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(_Steps(args.steps), batch_size=1))
    times = json.loads(marks.read_text())
    times = times[args.warmup :]
    per_round = [b[0] - a[0] for a, b in itertools.pairwise(times)]
    steps = times[-1][1] - times[0][1]
    return {
        "round_ms": 1e3 * statistics.median(per_round),
        "step_ms": 1e3 * (times[-1][0] - times[0][0]) / max(steps, 1),
        "steps_per_round": steps / max(len(per_round), 1),
    }


def _evaluation_ms(args: argparse.Namespace) -> float:
    """Median time of ``training_step`` + ``backward`` alone, outside any Trainer."""
    torch.set_num_threads(1)
    module = CheapModule(args.params, args.work)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    batch = torch.ones(1, 4)
    times = []
    for _ in range(max(args.steps, 20)):
        start = time.perf_counter()
        module.zero_grad(set_to_none=False)
        module.training_step(batch, 0).backward()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000, help="D. Default is 100,000.")
    parser.add_argument("--window", type=int, default=2, help="P. Default is 2.")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run. Default is 120.")
    parser.add_argument("--warmup", type=int, default=5, help="rounds left out of the timing. Default is 5.")
    parser.add_argument("--work", type=int, default=0, help="matrix products per step. Default is 0.")
    parser.add_argument("--runs", nargs="+", default=["sequential", "picard-1", "picard-2"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    evaluation = _evaluation_ms(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: _run(name, args, Path(tmp)) for name in args.runs}
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, D={args.params:,}, P={args.window}, "
        f"work={args.work}, {args.steps} steps; training_step + backward alone: {evaluation:.2f} ms"
    )
    print("| run | ms per step | ms per round | steps per round | round overhead (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        world = 1 if name == "sequential" else int(name.split("-")[1])
        slots = 1 if name == "sequential" else -(-args.window // world)
        overhead = r["round_ms"] - slots * evaluation
        print(
            f"| {name} | {r['step_ms']:.2f} | {r['round_ms']:.2f} | {r['steps_per_round']:.2f} | {overhead:.2f} |"
        )


if __name__ == "__main__":
    main()
