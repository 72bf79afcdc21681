"""Every unsupported setting fails early with an error that says what to do."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_picard as lp
from tests.toy import ToyRegression, quiet_trainer_kwargs, regression_data


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window_size": 0}, ValueError, "window_size must be at least 1"),
        ({"window_size": 2.5}, TypeError, "window_size must be an int"),
        ({"threshold": -1e-6}, ValueError, "threshold must be >= 0"),
        ({"threshold": float("nan")}, ValueError, "threshold must be >= 0"),
        ({"ema_decay": 1.5}, ValueError, r"ema_decay must be in \[0, 1\]"),
        ({"ema_decay": -0.1}, ValueError, r"ema_decay must be in \[0, 1\]"),
        ({"aggregate": "middle"}, ValueError, "aggregate must be one of"),
        ({"init": "zeros"}, ValueError, "init must be one of"),
        ({"seed": -1}, ValueError, "seed must be a non-negative int"),
        ({"timeout": 30}, ValueError, "timeout must be a positive datetime.timedelta"),
        ({"start_method": "thread"}, ValueError, "start_method must be"),
        ({"process_group_backend": "tcp"}, ValueError, "process_group_backend must be"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        lp.PicardStrategy(**kwargs)


def test_registered_names_and_defaults():
    for name, start_method in (("picard", "popen"), ("picard_spawn", "spawn"), ("picard_fork", "fork")):
        assert name in StrategyRegistry.available_strategies()
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, lp.PicardStrategy) and strategy._start_method == start_method
    trainer = pl.Trainer(strategy="picard", accelerator="cpu", devices=3, logger=False)
    assert trainer.strategy.window_size == 3, "window_size=None means one slot per rank"
    assert trainer.strategy.slots_per_rank == 1


def test_window_larger_than_world_gives_several_slots_per_rank():
    strategy = lp.PicardStrategy(window_size=5)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    assert strategy.slots_per_rank == 3
    ownership = strategy.ownership
    rows = {ownership.gathered_row(j) for j in range(5)}
    assert len(rows) == 5 and max(rows) < 2 * 3
    assert [ownership.rank_of(ownership.gathered_row(j)) for j in range(5)] == [0, 1, 0, 1, 0]
    assert ownership.owned(5) == [4, 2, 0], "rank 0 evaluates slots 0, 2, 4, the anchor last"


def _fit(module, **trainer_kwargs):
    trainer = pl.Trainer(
        devices=1,
        max_steps=2,
        strategy=lp.PicardStrategy(window_size=2),
        **quiet_trainer_kwargs(**trainer_kwargs),
    )
    trainer.fit(module, regression_data())


class ManualOptimization(ToyRegression):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(ToyRegression):
    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[3].parameters(), lr=0.1),
        ]


class IterTrainingStep(ToyRegression):
    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)
        return super().training_step(batch, 0)


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "match"),
    [
        (ManualOptimization, {}, "needs automatic optimization"),
        (TwoOptimizers, {}, "exactly one optimizer"),
        (ToyRegression, {"accumulate_grad_batches": 2}, "does not support gradient accumulation"),
        (
            ToyRegression,
            {"plugins": [MixedPrecision("16-mixed", "cpu")]},
            "does not support precision='16-mixed'",
        ),
        (IterTrainingStep, {}, "dataloader_iter"),
    ],
)
def test_unsupported_training_setups_say_what_to_do(module, trainer_kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        _fit(module(), **trainer_kwargs)


def test_pytorch_lightning_trainer_is_rejected_with_a_hint():
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    lp.register_pytorch_lightning_guard()
    with pytest.raises(RuntimeError, match=r"lightning\.pytorch\.Trainer"):
        pytorch_lightning.Trainer(strategy="picard", accelerator="cpu", devices=1)


def test_bf16_mixed_precision_is_accepted():
    _fit(ToyRegression(), precision="bf16-mixed")
