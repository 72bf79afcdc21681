"""A module that changes dimensions and has step-dependent buffers, like 3D Gaussians with an occupancy grid."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class GrowingBumps(pl.LightningModule):
    """A sum of Gaussian bumps fit to ``sin(3x)·cos(2y)``, densified and pruned as 3D Gaussians are.

    Picard parameters: ``centers [N, 2]``, ``heights [N]``, ``log_widths [N]`` (their rows change) and
    ``offset [1]``. Step output: ``hits [N]`` (samples near each bump, written by ``training_step`` and read by
    the step hook). Picard buffers: ``grad_accum [N]`` (densification statistics from the heights' gradients
    and the hits, resized with the bumps), ``occupancy [8, 8]`` (refreshed from the state every
    ``occupancy_every`` steps, it gates the prediction) and ``level`` (a progressive schedule of the step that
    narrows the bumps). Every ``densify_every`` steps, bumps whose accumulated gradient is at least the median
    are cloned (the clone is jittered with the hook's seeded RNG; parent and clone share the height) and bumps
    with a tiny height are pruned; Adam's moments follow the parents, fresh rows start at zero.
    """

    def __init__(
        self,
        bumps: int = 6,
        densify_every: int = 3,
        occupancy_every: int = 4,
        max_bumps: int = 40,
        buffers_in_error: bool = True,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.centers = torch.nn.Parameter(torch.rand(bumps, 2, generator=generator) * 2 - 1)
        self.heights = torch.nn.Parameter(torch.randn(bumps, generator=generator) * 0.3)
        self.log_widths = torch.nn.Parameter(torch.full((bumps,), -1.0))
        self.offset = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("grad_accum", torch.zeros(bumps))
        self.register_buffer("occupancy", torch.ones(8, 8))
        self.register_buffer("level", torch.zeros(()))
        self.register_buffer("hits", torch.zeros(bumps))
        self.densify_every = densify_every
        self.occupancy_every = occupancy_every
        self.max_bumps = max_bumps
        self.buffers_in_error = buffers_in_error
        self.lr = lr
        self._register_load_state_dict_pre_hook(self._resize_to_loaded)
        self.resizes: list[tuple[int, int, int]] = []
        """(step, bumps pruned, bumps cloned) of every densification."""

    def picard_buffers(self):
        return {"grad_accum": self.buffers_in_error, "occupancy": self.buffers_in_error, "level": False}

    def picard_step_outputs(self):
        return ["hits"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = torch.exp(self.log_widths) / (1 + 0.25 * self.level)
        d2 = (x[:, None, :] - self.centers[None]).square().sum(-1)
        bumps = (self.heights * torch.exp(-d2 / width.square())).sum(-1)
        cells = ((x + 1) * 4).long().clamp(0, 7)
        gate = 0.5 + 0.5 * self.occupancy[cells[:, 0], cells[:, 1]]
        return bumps * gate + self.offset

    def training_step(self, batch, batch_idx):
        x = torch.rand(32, 2) * 2 - 1  # seeded per step by the strategy or StepSeed
        target = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])
        with torch.no_grad():  # a step output: how many samples fell within each bump's width
            near = (x[:, None, :] - self.centers[None]).square().sum(-1) < torch.exp(self.log_widths).square()
            self.hits = near.float().sum(0)
        return (self(x) - target).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def picard_after_optimizer_step(self, step: int):
        if self.heights.grad is not None:
            self.grad_accum += self.heights.grad.abs() + 0.01 * self.hits
        self.level.fill_(min((step + 1) // 6, 2))
        if (step + 1) % self.occupancy_every == 0:
            self.occupancy.copy_(self._occupancy())
        if (step + 1) % self.densify_every == 0:
            return self._densify_and_prune(step)
        return None

    def _occupancy(self) -> torch.Tensor:
        axis = (torch.arange(8) + 0.5) / 4 - 1
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        width = torch.exp(self.log_widths)
        d2 = (grid[:, None, :] - self.centers[None]).square().sum(-1)
        density = (self.heights.abs() * torch.exp(-d2 / width.square())).sum(-1)
        return (density > 0.4).float().reshape(8, 8)

    def _densify_and_prune(self, step: int) -> dict[str, torch.Tensor]:
        n = self.heights.shape[0]
        rows = torch.arange(n)
        pruned = self.heights.abs() < 0.05
        if int((~pruned).sum()) < 2:
            pruned[:] = False
        grow = (self.grad_accum >= self.grad_accum.median()) & ~pruned
        kept = rows[~pruned]
        cloned = rows[grow][: max(self.max_bumps - kept.numel(), 0)]
        parents = torch.cat([kept, cloned])
        fresh = torch.cat(
            [torch.zeros(kept.numel(), dtype=torch.bool), torch.ones(cloned.numel(), dtype=torch.bool)]
        )

        centers = self.centers[parents].clone()
        centers[fresh] += 0.05 * torch.randn(cloned.numel(), 2)
        heights = self.heights[parents].clone()
        shared = torch.isin(parents, cloned)
        heights[shared] *= 0.5
        log_widths = self.log_widths[parents].clone()

        optimizer = self.optimizers(use_pl_optimizer=False)
        for param, value in ((self.centers, centers), (self.heights, heights), (self.log_widths, log_widths)):
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    moment = state[key][parents].clone()
                    moment[fresh] = 0
                    state[key] = moment
            param.data = value
            param.grad = None
        self.grad_accum = torch.zeros(parents.numel())
        self.hits = torch.zeros(parents.numel())
        self.resizes.append((step, n - kept.numel(), cloned.numel()))
        return {name: parents for name in ("centers", "heights", "log_widths", "grad_accum", "hits")}

    def _resize_to_loaded(self, state_dict, prefix, *args) -> None:
        """Accept a state dict of another size (a checkpoint, or weights sent back by a fork launcher)."""
        for name in ("centers", "heights", "log_widths"):
            getattr(self, name).data = torch.empty_like(state_dict[prefix + name])
        self.grad_accum = torch.empty_like(state_dict[prefix + "grad_accum"])
        self.hits = torch.empty_like(state_dict[prefix + "hits"])


def step_data(steps: int = 64) -> DataLoader:
    """One dummy batch per step (the module draws its samples inside ``training_step``)."""
    return DataLoader(TensorDataset(torch.arange(steps, dtype=torch.float32)), batch_size=1)


def state(module: GrowingBumps) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, detached copies."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def assert_same_state(a: GrowingBumps, b: GrowingBumps) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].shape == sb[name].shape, f"{name}: {tuple(sa[name].shape)} vs {tuple(sb[name].shape)}"
        assert torch.equal(sa[name], sb[name]), f"{name} differs"
