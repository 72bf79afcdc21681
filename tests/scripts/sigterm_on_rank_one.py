"""Rank 1 receives a real SIGTERM after step 6; run as a script with the default (subprocess) launcher.

Every rank writes ``rank<r>`` into the folder given: the exception it stopped with and the step it stopped at.
"""

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl

import lightning_picard as lp
from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data


class SigtermOnRankOne(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 1 and trainer.global_step >= 6 and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception):
        (self.folder / f"rank{trainer.global_rank}").write_text(
            f"{type(exception).__name__} {trainer.global_step}"
        )


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    trainer = pl.Trainer(
        devices=2,
        max_steps=40,
        strategy=lp.PicardStrategy(window_size=2, threshold=0.0),
        default_root_dir=folder,
        **quiet_trainer_kwargs(callbacks=[SigtermOnRankOne(folder)]),
    )
    trainer.fit(ToyRegression(), regression_data())
