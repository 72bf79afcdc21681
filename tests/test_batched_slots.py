"""picard_training_step_slots: several slots of one rank evaluated as one batch, against one by one.

Bit equality with the one-by-one evaluation cannot be asked of a batched model call: a matrix product over B rows
is blocked and reduced differently for different B (the kernel picks its tiling and its summation order by the
shape), so the same row can come out a few ulps apart. Where nothing is batched (``batch_critic=False``: each slot's
critic call is its own) the batched path must give the very same bits; where the critic is batched, the same
values to float tolerance.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_picard as lp
from tests.toy import quiet_trainer_kwargs, regression_data

STEPS = 8


class BatchedToy(pl.LightningModule):
    """A regression "rendered" by a small net from each slot's parameters, scored by a frozen critic (the stand-in
    for a diffusion model, called once over every slot's outputs), with a Picard buffer, a step output and a step
    hook that reads both."""

    def __init__(
        self,
        batched: bool = True,
        batch_critic: bool = True,
        fail_at: int | None = None,
        stop_at: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.critic = torch.nn.Linear(3, 3).requires_grad_(False)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("stat", torch.zeros(3))
        self.register_buffer("accumulated", torch.zeros(3))
        self.batch_critic = batch_critic
        self.fail_at = fail_at
        self.stop_at = stop_at
        self.fail_after_backward_at: int | None = None
        self.after_backward: list[tuple[int, float]] = []
        self.before_backward: list[tuple[int, float]] = []
        if not batched:
            self.picard_training_step_slots = None

    # --- one step, in parts the batched path shares -------------------------------------------------------------

    def _forward(self, batch):
        x, y = batch
        if self.global_step == self.fail_at:
            raise ValueError(f"step {self.global_step} fails")
        if self.global_step == self.stop_at:
            self.trainer.should_stop = True
        noise = 0.01 * torch.randn(x.shape)  # the global RNG, seeded per step
        h = self.net(x + noise) * self.scale
        self.stat.copy_(h.detach().mean(dim=0))
        return h, y

    def _loss(self, h, y, target):
        loss = (h[:, :1] - y).square().mean() + 0.1 * (h * target).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        h, y = self._forward(batch)
        return self._loss(h, y, self.critic(h.detach()))

    def picard_training_step_slots(self, slots):
        prepared = []
        for slot in slots:
            with slot:
                assert self.global_step == slot.step and self.net[0].weight is slot.parameters["net.0.weight"]
                ours, theirs = slot.generator(offset=3), lp.step_generator(offset=3)
                assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))
                prepared.append(self._forward(slot.batch))
        inputs = [h.detach() for h, _ in prepared]
        if self.batch_critic:
            targets = self.critic(torch.cat(inputs)).split([len(h) for h in inputs])
        else:
            targets = [self.critic(h) for h in inputs]
        losses = []
        for slot, (h, y), target in zip(slots, prepared, targets):
            with slot:
                losses.append(self._loss(h, y, target))
        return losses

    # --- the Picard protocol ------------------------------------------------------------------------------------

    def picard_buffers(self):
        return {"scale": True, "accumulated": True}

    def picard_step_outputs(self):
        return ["stat"]

    @torch.no_grad()
    def picard_after_optimizer_step(self, step):
        self.accumulated.add_(self.stat)
        self.scale.mul_(1.0 - 0.01 * torch.tanh(self.accumulated))
        return None

    def on_before_backward(self, loss):
        self.before_backward.append((self.global_step, float(loss.detach())))

    def on_after_backward(self):
        if self.global_step == self.fail_after_backward_at:
            raise RuntimeError(f"on_after_backward fails at step {self.global_step}")
        norm = torch.cat([p.grad.reshape(-1) for p in self.net.parameters()]).norm()
        self.after_backward.append((self.global_step, float(norm)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=0.05)


def state(module: BatchedToy) -> torch.Tensor:
    tensors = [*module.net.parameters(), module.scale, module.accumulated]
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def fit(module: BatchedToy, window_size: int | None = 4, **strategy_kwargs) -> pl.Trainer:
    if window_size is None:
        trainer = pl.Trainer(devices=1, max_steps=STEPS, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs())
    else:
        strategy = lp.PicardStrategy(window_size=window_size, **{"threshold": 0.0, **strategy_kwargs})
        trainer = pl.Trainer(devices=1, max_steps=STEPS, strategy=strategy, **quiet_trainer_kwargs())
    trainer.fit(module, regression_data())
    return trainer


@pytest.fixture(scope="module")
def sequential():
    module = BatchedToy(batched=False)
    trainer = fit(module, window_size=None)
    return module, trainer


@pytest.fixture(scope="module")
def one_by_one():
    module = BatchedToy(batched=False)
    return module, fit(module)


def test_threshold_zero_with_the_hook_off_is_bit_identical_to_sequential(sequential, one_by_one):
    assert torch.equal(state(one_by_one[0]), state(sequential[0]))


def test_batched_without_a_batched_call_gives_the_same_bits(sequential, one_by_one):
    """Nothing batched inside the hook: the sum's backward gives every slot exactly its own gradient."""
    module = BatchedToy(batch_critic=False)
    fit(module)
    assert torch.equal(state(module), state(sequential[0]))
    assert module.after_backward == one_by_one[0].after_backward


def test_batched_critic_matches_one_by_one_to_float_tolerance(sequential, one_by_one):
    module = BatchedToy()
    trainer = fit(module)
    torch.testing.assert_close(state(module), state(sequential[0]), rtol=1e-5, atol=1e-6)
    reference_module, reference = one_by_one
    # The per-slot hooks ran for the same steps, in the same order, with each slot's own loss and gradient.
    assert [s for s, _ in module.before_backward] == [s for s, _ in reference_module.before_backward]
    assert [s for s, _ in module.after_backward] == [s for s, _ in reference_module.after_backward]
    torch.testing.assert_close(
        torch.tensor([v for _, v in module.after_backward]),
        torch.tensor([v for _, v in reference_module.after_backward]),
        rtol=1e-5,
        atol=1e-7,
    )
    # self.log inside `with slot:` reaches the accepted steps' values only, as one by one.
    for key in ("train_loss_step", "train_loss_epoch"):
        torch.testing.assert_close(trainer.callback_metrics[key], reference.callback_metrics[key])
    assert trainer.global_step == reference.global_step == STEPS


def test_positive_tolerance_runs_batched_and_needs_fewer_rounds():
    module = BatchedToy()
    trainer = fit(module, window_size=4, threshold=None, tolerance=0.5)
    assert trainer.global_step == STEPS
    assert trainer.callback_metrics["picard/rounds"].item() < STEPS


def test_should_stop_in_a_slot_stops_at_that_step_as_one_by_one():
    reference = fit(BatchedToy(batched=False, stop_at=5))
    trainer = fit(BatchedToy(stop_at=5))
    assert trainer.global_step == reference.global_step == 6


@pytest.mark.parametrize("where", ["training_step", "on_after_backward"])
def test_a_failing_step_fails_as_without_the_hook(where):
    """The batch raises, the round is evaluated again one by one: the same error at the same step, and the steps
    before it accepted."""

    def failing(batched: bool) -> BatchedToy:
        module = BatchedToy(batched=batched, fail_at=5 if where == "training_step" else None)
        module.fail_after_backward_at = 5 if where == "on_after_backward" else None
        return module

    with pytest.raises((ValueError, RuntimeError), match=r"fails at step 5|step 5 fails"):
        fit(reference := failing(batched=False))
    with pytest.raises((ValueError, RuntimeError), match=r"fails at step 5|step 5 fails"):
        fit(module := failing(batched=True))
    assert module.trainer.global_step == reference.trainer.global_step > 0
    torch.testing.assert_close(
        state(module), state(reference), rtol=1e-5, atol=1e-6
    )  # earlier rounds batched


class LogsOutsideSlots(BatchedToy):
    def picard_training_step_slots(self, slots):
        losses = super().picard_training_step_slots(slots)
        self.log("outside", 1.0)
        return losses


class ReturnsTooFew(BatchedToy):
    def picard_training_step_slots(self, slots):
        return super().picard_training_step_slots(slots)[:-1]


@pytest.mark.parametrize(
    ("module_class", "message"),
    [(LogsOutsideSlots, "outside a slot"), (ReturnsTooFew, "returned 3 outputs for 4 slots")],
)
def test_a_hook_that_breaks_the_contract_fails_with_what_to_do(module_class, message):
    with pytest.raises(MisconfigurationException, match=message) as raised:
        fit(module_class())
    assert "picard_training_step_slots = None" in "".join(getattr(raised.value, "__notes__", []))


class WithLocalParameters(BatchedToy):
    def __init__(self) -> None:
        super().__init__()
        self.probe = torch.nn.Linear(3, 1)

    def picard_local_parameters(self):
        return list(self.probe.parameters())


def test_rank_local_parameters_are_refused():
    with pytest.raises(MisconfigurationException, match="picard_local_parameters"):
        fit(WithLocalParameters())


def test_one_slot_per_rank_never_calls_the_hook():
    class Refuses(BatchedToy):
        def picard_training_step_slots(self, slots):
            raise AssertionError("called with one slot per round")

    module = Refuses()
    fit(module, window_size=1)
    assert module.trainer.global_step == STEPS


def test_binding_restores_the_parameters_in_order():
    module = BatchedToy()
    before = [(name, p) for name, p in module.named_parameters()]
    leaf = torch.zeros_like(module.net[0].weight, requires_grad=True)
    buffers = {"stat": torch.full((3,), 7.0)}
    with lp.slots.bind(module, {"net.0.weight": leaf}, buffers):
        assert module.net[0].weight is leaf
        module.stat = torch.ones(3)  # reassigned inside: the slot keeps the new tensor
    assert [(name, p) for name, p in module.named_parameters()] == before
    torch.testing.assert_close(buffers["stat"], torch.ones(3))
    assert torch.equal(module.stat, torch.zeros(3))
    with (
        pytest.raises(ValueError, match=r"no parameter 'net\.0\.missing'"),
        lp.slots.bind(module, {"net.0.missing": leaf}, {}),
    ):
        pass


@pytest.mark.multiprocess
def test_two_ranks_with_two_slots_each_match_one_by_one(sequential):
    module = BatchedToy()
    strategy = lp.PicardStrategy(window_size=4, threshold=0.0, start_method="fork")
    trainer = pl.Trainer(devices=2, max_steps=STEPS, strategy=strategy, **quiet_trainer_kwargs())
    trainer.fit(module, regression_data())
    torch.testing.assert_close(state(module), state(sequential[0]), rtol=1e-5, atol=1e-6)
