"""How far rank-local trainables that feed the main gradient (VSD's LoRA) move the main trajectory at threshold 0.

The module is VSD in miniature: the main parameters θ produce a "render" x = A·tanh(θ); the main gradient is
the VSD-like difference between a noisy target score and a *rank-local* critic's estimate of the current
distribution, ``(x − target + 0.5·ε) − λ·(critic(x̃) − x̃)`` with x̃ the noised render; the critic (rank-local, its own Adam, stepped in
``on_after_backward`` on the evaluating rank, as ProlificDreamer's LoRA) is fitted to the noised current render.
Under Picard each rank steps its critic once per slot it evaluates, speculative slots included, so the critic
that a slot's gradient sees depends on the window and on which rank evaluated it.

Printed: ‖θ − θ_sequential‖²/D for Picard at threshold 0 on 1 rank (P slots evaluated one after the other) and on
2 ranks, next to the distance between two sequential runs with different seeds, and the same for a module whose
critic does *not* feed the main gradient (λ = 0: exact, as the guarantee says).

    .venv/bin/python benchmarks/local_drift.py [--steps 60] [--window 4]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_picard as lp
from tests.toy import quiet_trainer_kwargs
from tests.toy_resizing import step_data


class MiniVSD(pl.LightningModule):
    """Main θ [16] (Picard state) and a rank-local critic (Linear 32 → 32) that feeds the main gradient."""

    def __init__(self, coupling: float = 0.5) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.theta = torch.nn.Parameter(torch.randn(16, generator=generator) * 0.1)
        self.register_buffer("mixing", torch.randn(32, 16, generator=generator) / 4)
        self.register_buffer("target", torch.randn(32, generator=generator))
        self.critic = torch.nn.Linear(32, 32)
        with torch.no_grad():
            self.critic.weight.copy_(torch.eye(32) + 0.01 * torch.randn(32, 32, generator=generator))
            self.critic.bias.zero_()
        self.coupling = coupling

    def picard_local_parameters(self):
        return self.critic.parameters()

    def on_fit_start(self) -> None:
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=1e-2)

    def training_step(self, batch, batch_idx):
        x = self.mixing @ torch.tanh(self.theta)
        noised = x.detach() + 0.3 * torch.randn(32)  # seeded per step
        with torch.no_grad():
            score = (x.detach() - self.target) + 0.5 * torch.randn(32)
            score = score - self.coupling * (self.critic(noised) - noised)
        critic_loss = (self.critic(noised) - x.detach()).square().mean()
        return (x * score).sum() / 32 + critic_loss

    def on_after_backward(self) -> None:
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad()

    def configure_optimizers(self):
        return torch.optim.Adam([self.theta], lr=0.02)


def fit(steps: int, coupling: float, strategy=None, seed: int = 0, devices: int = 1) -> torch.Tensor:
    module = MiniVSD(coupling)
    callbacks = [] if strategy is not None else [lp.StepSeed(seed)]
    kwargs = quiet_trainer_kwargs(devices=devices, max_steps=steps, callbacks=callbacks)
    trainer = pl.Trainer(**kwargs) if strategy is None else pl.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, step_data(steps))
    return module.theta.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")
    print(f"{'coupling':>8} {'run':<28} {'‖Δθ‖²/D to sequential':>22} {'/ seed spread':>13}")
    for coupling in (0.5, 0.0):
        reference = fit(args.steps, coupling)
        spread = (fit(args.steps, coupling, seed=1) - reference).square().mean().item()
        print(f"{coupling:>8} {'sequential, seed 1':<28} {spread:>22.3e} {1.0:>13.3f}")
        for devices in (1, 2):
            strategy = lp.PicardStrategy(window_size=args.window, threshold=0.0, start_method="fork")
            theta = fit(args.steps, coupling, strategy, devices=devices)
            distance = (theta - reference).square().mean().item()
            label = f"Picard P={args.window}, {devices} rank(s), e=0"
            print(f"{coupling:>8} {label:<28} {distance:>22.3e} {distance / spread:>13.3f}")


if __name__ == "__main__":
    main()
