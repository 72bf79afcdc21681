"""Small LightningModules and data for the strategy tests."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

LAUNCH_ENVIRONMENT = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "RANK",
    "OMP_NUM_THREADS",
)
"""What Lightning's launchers export into the launching process."""


class ToyRegression(pl.LightningModule):
    """Linear–Dropout–Linear regression whose step also draws from numpy and ``random``."""

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 0.05,
        step_lr: bool = True,
        hidden: int = 16,
        noise: float = 0.0,
    ) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1)
        )
        self.optimizer_name = optimizer
        self.lr = lr
        self.step_lr = step_lr
        self.noise = noise
        self.seen_steps: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_steps.append((self.global_step, batch_idx))
        jitter = float(np.random.uniform(-0.01, 0.01)) + random.uniform(-0.01, 0.01)
        pred = self.net(x + jitter)
        loss = (pred - y).square().mean()
        if self.noise:
            loss = loss + self.noise * (torch.randn(()) * pred.mean())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[
            self.optimizer_name
        ]
        optimizer = cls(self.parameters(), lr=self.lr)
        if not self.step_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def regression_data(n: int = 64, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0], [0.1]]) + 0.1 * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def quiet_trainer_kwargs(**overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


def final_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class RegressionData(pl.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return regression_data(self.n, self.batch_size)
