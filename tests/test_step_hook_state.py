"""State the step hook changes must be declared: an undeclared buffer or tensor attribute is an error naming it."""

import lightning.pytorch as pl
import pytest
import torch

import lightning_picard as lp
from lightning_picard.hooks import changed_tensors, undeclared_tensor_versions
from tests.toy import quiet_trainer_kwargs
from tests.toy_resizing import step_data


class HookState(pl.LightningModule):
    """A linear fit whose step hook updates ``seen`` (declared or not) in place, or rebinds ``cache``."""

    def __init__(self, declare: bool = True, mutate: str = "seen") -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("seen", torch.zeros(()))
        self.inner = torch.nn.Linear(1, 1)
        self.inner.requires_grad_(False)
        self.cache = torch.zeros(3)  # a plain tensor attribute, not a buffer
        self.declare = declare
        self.mutate = mutate

    def picard_buffers(self):
        return {"seen": False} if self.declare else {}

    def training_step(self, batch, batch_idx):
        x = torch.randn(8, 3)
        return (x @ self.weight - x.sum(1) * (1 + self.seen)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @torch.no_grad()
    def picard_after_optimizer_step(self, step: int):
        if self.mutate == "seen":
            self.seen.add_(0.01)
        elif self.mutate == "cache":
            self.cache = self.weight.detach().clone()
        elif self.mutate == "inner":
            self.inner.bias.add_(1.0)  # a frozen parameter is not covered (not Picard state, not a buffer)
        return None


def _fit(module, strategy=None, callbacks=()):
    kwargs = quiet_trainer_kwargs(devices=1, max_steps=6, callbacks=list(callbacks))
    trainer = pl.Trainer(**kwargs) if strategy is None else pl.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, step_data(8))
    return module


def test_a_declared_buffer_may_change():
    sequential = _fit(HookState(), callbacks=[lp.StepSeed(0)])
    picard = _fit(HookState(), lp.PicardStrategy(window_size=3, threshold=0))
    assert sequential.seen.item() == pytest.approx(0.06)
    assert torch.equal(picard.weight, sequential.weight) and torch.equal(picard.seen, sequential.seen)


@pytest.mark.parametrize("picard", [False, True], ids=["sequential", "picard"])
def test_an_undeclared_buffer_changed_in_place_is_named(picard):
    module = HookState(declare=False)
    with pytest.raises(RuntimeError, match=r"changed \['seen'\], which are not Picard state"):
        if picard:
            _fit(module, lp.PicardStrategy(window_size=3, threshold=0))
        else:
            _fit(module, callbacks=[lp.StepSeed(0)])


def test_a_rebound_tensor_attribute_is_named():
    with pytest.raises(RuntimeError, match=r"changed \['cache'\]"):
        _fit(HookState(mutate="cache"), lp.PicardStrategy(window_size=2, threshold=0))


def test_versions_cover_buffers_and_tensor_attributes_of_submodules_but_not_parameters():
    module = HookState(declare=False)
    module.inner.register_buffer("counter", torch.zeros(2))
    before = undeclared_tensor_versions(module)
    assert {"seen", "cache", "inner.counter"} <= before.keys()
    assert not {"weight", "inner.weight", "inner.bias"} & before.keys()
    module.inner.counter += 1
    module.inner.bias.data += 1
    assert changed_tensors(before, undeclared_tensor_versions(module)) == ["inner.counter"]
    with torch.inference_mode():
        module.fresh = torch.zeros(1)  # an inference tensor (no version counter): added
    assert changed_tensors(before, undeclared_tensor_versions(module)) == ["fresh", "inner.counter"]
