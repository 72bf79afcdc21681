"""lightning_picard: parallel-in-time (generalized Picard) training for PyTorch Lightning.

Importing the package registers the strategy names ``"picard"`` (subprocess launch, for GPUs and
clusters), ``"picard_spawn"`` and ``"picard_fork"`` with ``lightning.pytorch``::

    import lightning.pytorch as pl
    import lightning_picard

    trainer = pl.Trainer(strategy="picard", devices=8, max_steps=10_000)
"""

import sys

from lightning.pytorch.strategies import StrategyRegistry

from lightning_picard.callbacks import StepSeed
from lightning_picard.errors import PicardRankError
from lightning_picard.flat import FlatParameters
from lightning_picard.hooks import local_parameters, picard_parameters
from lightning_picard.progress import PicardProgressBar, PicardRichProgressBar
from lightning_picard.rng import current_step_seed, step_generator, step_rng, step_seed
from lightning_picard.shard import BatchShard, batch_shard
from lightning_picard.slots import PicardSlot
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.strategy import PicardStrategy, at_round_end
from lightning_picard.window import PicardWindow, RoundResult

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchShard",
    "FlatParameters",
    "OptimizerSnapshot",
    "PicardProgressBar",
    "PicardRankError",
    "PicardRichProgressBar",
    "PicardSlot",
    "PicardStrategy",
    "PicardWindow",
    "RoundResult",
    "StepSeed",
    "at_round_end",
    "batch_shard",
    "current_step_seed",
    "local_parameters",
    "picard_parameters",
    "step_generator",
    "step_rng",
    "step_seed",
]

PicardStrategy.register_strategies(StrategyRegistry)


def _reject_pytorch_lightning(**_: object) -> None:
    raise RuntimeError(
        "lightning_picard works with `lightning.pytorch.Trainer`, not `pytorch_lightning.Trainer` (a separate copy "
        "of Lightning). Use `import lightning.pytorch as pl` and `pl.Trainer(strategy='picard')`."
    )


def register_pytorch_lightning_guard() -> None:
    """Make ``pytorch_lightning.Trainer(strategy="picard")`` fail with an error that says what to use instead."""
    from pytorch_lightning.strategies import StrategyRegistry as PytorchLightningRegistry

    for name in ("picard", "picard_spawn", "picard_fork"):
        PytorchLightningRegistry.register(
            name, _reject_pytorch_lightning, description="use lightning.pytorch.Trainer", override=True
        )


if "pytorch_lightning" in sys.modules:
    register_pytorch_lightning_guard()
