"""One node of a 2-node Picard fit on CPU; started by tests/test_multinode.py through a launcher.

Usage: ``python picard_node.py OUTPUT_DIR [--devices N] [--window-size P] [--slot-group-size G] [--fail-at STEP]
[--signal-at STEP]``
with the launcher's environment (``NODE_RANK``, or torchrun's or srun's variables). Each rank writes
``OUTPUT_DIR/rank<global rank>.pt`` with its final parameters, the steps it evaluated and the ranks and cluster
environment Lightning gave it. ``--fail-at`` makes the last rank raise while evaluating that step (or any later one);
``--signal-at`` makes every rank send itself SIGUSR1 (SLURM's requeue signal) while it first evaluates that step.
"""

import argparse
import os
import signal
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning_picard as lp
from tests.toy import ToyRegression, final_parameters, quiet_trainer_kwargs, regression_data

STEPS = 12


class Node(ToyRegression):
    def __init__(self, fail_at: int | None, signal_at: int | None) -> None:
        super().__init__()
        self.fail_at, self.signal_at = fail_at, signal_at

    def training_step(self, batch, batch_idx):
        last_rank = self.global_rank == self.trainer.world_size - 1
        if self.fail_at is not None and last_rank and self.global_step >= self.fail_at:
            raise ValueError("bad render on the last node")
        if self.global_step == self.signal_at:
            self.signal_at = None
            os.kill(os.getpid(), signal.SIGUSR1)  # as `sbatch --signal=USR1@90` does near the time limit
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--window-size", type=int, default=4)
    parser.add_argument("--slot-group-size", type=int, default=1)
    parser.add_argument("--fail-at", type=int, default=None)
    parser.add_argument("--signal-at", type=int, default=None)
    args = parser.parse_args()
    module = Node(args.fail_at, args.signal_at)
    strategy = lp.PicardStrategy(
        window_size=args.window_size,
        threshold=0.0,
        timeout=timedelta(seconds=60),
        slot_group_size=args.slot_group_size,
    )
    trainer = pl.Trainer(
        num_nodes=2,
        devices=args.devices,
        max_steps=STEPS,
        gradient_clip_val=0.5,
        strategy=strategy,
        default_root_dir=args.output,
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    result = {
        "parameters": final_parameters(module),
        "evaluated_steps": [step for step, _ in module.seen_steps],
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
        "world_size": trainer.world_size,
        "environment": type(strategy.cluster_environment).__name__,
        "global_step": trainer.global_step,
        "rounds": int(trainer.callback_metrics["picard/rounds"].item()),
        "threads": torch.get_num_threads(),
    }
    torch.save(result, args.output / f"rank{trainer.global_rank}.pt")
