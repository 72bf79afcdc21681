"""Multi-threaded CPU work in this process, then a picard_fork fit (as a user comparing runs in one script)."""

import sys

import lightning.pytorch as pl
import torch

import lightning_picard  # noqa: F401  (registers picard_fork)
from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data

if __name__ == "__main__":
    devices = int(sys.argv[1])
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    for _ in range(20):
        a = torch.tanh(a @ a.T / 512)  # starts the OpenMP thread pool
    trainer = pl.Trainer(devices=devices, max_steps=4, strategy="picard_fork", **quiet_trainer_kwargs())
    trainer.fit(ToyRegression(hidden=256), regression_data(batch_size=64, n=256))
    print("finished")
