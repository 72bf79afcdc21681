"""Rank 1 raises while evaluating a step; run as a script with the default (subprocess) launcher."""

import sys

import lightning.pytorch as pl

import lightning_picard as lp
from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data


class FailsOnRankOne(ToyRegression):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step >= 5:
            raise ValueError("bad render")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    trainer = pl.Trainer(
        devices=2,
        max_steps=40,
        strategy=lp.PicardStrategy(window_size=4, threshold=0.0),
        default_root_dir=sys.argv[1],
        **quiet_trainer_kwargs(),
    )
    trainer.fit(FailsOnRankOne(), regression_data())
