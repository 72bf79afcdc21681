"""Rank-local trainables (ProlificDreamer's LoRA): never gathered, replayed or compared."""

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_picard as lp
from tests.toy import ToyRegression, final_parameters, quiet_trainer_kwargs, regression_data


class WithLocalCritic(ToyRegression):
    """A main network (Picard state) and a critic trained on detached inputs by its own optimizer."""

    def __init__(self, record_dir=None):
        super().__init__(step_lr=False)
        self.critic = torch.nn.Linear(4, 1)
        self.record_dir = record_dir

    def picard_local_parameters(self):
        return self.critic.parameters()

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def on_fit_start(self):
        self.local_optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)
        self.local_scheduler = torch.optim.lr_scheduler.StepLR(self.local_optimizer, step_size=2, gamma=0.5)
        self._record("start")

    def training_step(self, batch, batch_idx):
        x, y = batch
        critic_loss = (self.critic(x.detach()) - y).square().mean()
        return super().training_step(batch, batch_idx) + critic_loss

    def on_after_backward(self):
        self.local_optimizer.step()
        self.local_optimizer.zero_grad()
        self.local_scheduler.step()

    def on_train_end(self):
        self._record("end")

    def _record(self, when):
        if self.record_dir is not None:
            state = {
                "critic": self.critic.weight.detach().flatten().tolist(),
                "lr": self.local_optimizer.param_groups[0]["lr"],
            }
            (self.record_dir / f"{when}_rank{self.global_rank}.json").write_text(json.dumps(state))


def _critic(module):
    return module.critic.weight.detach().clone()


def _main(module):
    return final_parameters(module.net)


def _sequential(steps=8):
    module = WithLocalCritic()
    pl.Trainer(devices=1, max_steps=steps, callbacks=[lp.StepSeed(0)], **quiet_trainer_kwargs()).fit(
        module, regression_data()
    )
    return module


def test_window_one_is_sequential_for_main_and_local_parameters():
    reference = _sequential()
    module = WithLocalCritic()
    trainer = pl.Trainer(
        devices=1,
        max_steps=8,
        strategy=lp.PicardStrategy(window_size=1, threshold=0.0),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    assert torch.equal(_main(module), _main(reference))
    assert torch.equal(_critic(module), _critic(reference))


@pytest.mark.multiprocess
def test_local_parameters_stay_on_their_rank_and_the_main_trajectory_stays_exact(tmp_path):
    reference = _sequential()
    module = WithLocalCritic(record_dir=tmp_path)
    trainer = pl.Trainer(
        devices=2,
        max_steps=8,
        strategy=lp.PicardStrategy(window_size=2, threshold=0.0, start_method="fork"),
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, regression_data())
    assert torch.equal(_main(module), _main(reference)), "local parameters are not part of the Picard state"
    rank0 = json.loads((tmp_path / "end_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "end_rank1.json").read_text())
    assert rank0["critic"] != rank1["critic"], "each rank trains its own copy from the slots it evaluates"
    assert rank0["lr"] < 0.1 and rank1["lr"] < 0.1, "the local optimizer's scheduler runs"


@pytest.mark.multiprocess
def test_a_checkpoint_holds_rank_zeros_local_copy_and_resume_loads_it_everywhere(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first = pl.Trainer(
        devices=2,
        max_steps=4,
        strategy=lp.PicardStrategy(window_size=2, threshold=0.0, start_method="fork"),
        **quiet_trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint]),
    )
    first.fit(WithLocalCritic(record_dir=tmp_path), regression_data())
    saved = torch.load(tmp_path / "step=4.ckpt", weights_only=False)["state_dict"]["critic.weight"].flatten()
    assert saved.tolist() == json.loads((tmp_path / "end_rank0.json").read_text())["critic"]

    second = pl.Trainer(
        devices=2,
        max_steps=6,
        strategy=lp.PicardStrategy(window_size=2, threshold=0.0, start_method="fork"),
        **quiet_trainer_kwargs(),
    )
    second.fit(WithLocalCritic(record_dir=tmp_path), regression_data(), ckpt_path=tmp_path / "step=4.ckpt")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"start_rank{rank}.json").read_text())["critic"] == saved.tolist()


class LocalInMainOptimizer(WithLocalCritic):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def test_local_parameters_in_the_main_optimizer_are_refused():
    trainer = pl.Trainer(
        devices=1, max_steps=2, strategy=lp.PicardStrategy(window_size=2), **quiet_trainer_kwargs()
    )
    with pytest.raises(MisconfigurationException, match="also in the optimizer"):
        trainer.fit(LocalInMainOptimizer(), regression_data())
