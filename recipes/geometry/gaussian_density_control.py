"""Densify (clone/split), prune and opacity reset of 3D Gaussians on DreamGaussian's schedule.

Everything here is a deterministic function of (tensors, statistics, step): the only randomness, the
offsets of split children, comes from a generator seeded by ``(seed, step)``. Each operation returns
the new tensors together with the parent index map ``parents`` (row i of the new state descends from
row ``parents[i]`` of the old one) and the rows whose Adam moments restart from zero, so a Picard
replay can map gradients and guesses of the old size onto the new one (``old[parents]``) and resize
the optimizer state exactly as DreamGaussian does (kept rows keep their moments, new rows get zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from recipes.geometry.gaussians import PARAMETER_NAMES, inverse_sigmoid, quaternion_to_rotation


@dataclass
class DensificationSchedule:
    """When and how to densify and prune; defaults are DreamGaussian's ``configs/text.yaml``.

    Steps count completed optimizer steps from 1, as DreamGaussian's ``self.step`` (Lightning's
    ``global_step`` after the optimizer step). Gradient statistics are collected for steps in
    ``[start_step, end_step]``; densify+prune runs when ``step % interval == 0`` in that range, the
    opacity reset when ``step % opacity_reset_interval == 0``. ``grad_threshold`` applies to the mean
    norm of the loss gradient w.r.t. the projected means in NDC units, as in 3DGS.
    """

    start_step: int = 0
    end_step: int = 3000
    interval: int = 50
    opacity_reset_interval: int = 700
    grad_threshold: float = 0.01
    percent_dense: float = 0.01
    min_opacity: float = 0.01
    extent: float = 4.0
    max_screen_size: float | None = 1.0
    split_children: int = 2
    seed: int = 0

    def collects_statistics(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step

    def densifies_at(self, step: int) -> bool:
        return self.collects_statistics(step) and step % self.interval == 0

    def resets_opacity_at(self, step: int) -> bool:
        return self.collects_statistics(step) and step % self.opacity_reset_interval == 0

    def generator(self, step: int) -> torch.Generator:
        """CPU generator for the randomness of ``step`` (split offsets)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))


@dataclass
class DensificationStats:
    """Per-Gaussian screen-space gradient statistics accumulated between densifications."""

    grad_norm_sum: Tensor
    count: Tensor
    max_radii: Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> DensificationStats:
        return cls(
            torch.zeros(n, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device)
        )

    def accumulate(self, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> DensificationStats:
        """Add one rendered view: ``means2d_grad`` ``[N, 2]`` is dL/d(pixel position), ``radii`` ``[N]`` pixels.

        The gradient is converted to NDC units (× W/2, × H/2) as the 3DGS rasterizer reports it; only
        Gaussians with a positive radius (visible in the view) are counted.
        """
        visible = radii > 0
        scale = torch.tensor([0.5 * width, 0.5 * height], device=means2d_grad.device)
        norm = (means2d_grad * scale).norm(dim=-1)
        return DensificationStats(
            self.grad_norm_sum + torch.where(visible, norm, 0.0),
            self.count + visible.float(),
            torch.where(visible, torch.maximum(self.max_radii, radii.float()), self.max_radii),
        )

    def mean_grad(self) -> Tensor:
        return torch.where(self.count > 0, self.grad_norm_sum / self.count.clamp_min(1), 0.0)

    def select(self, rows: Tensor) -> DensificationStats:
        return DensificationStats(self.grad_norm_sum[rows], self.count[rows], self.max_radii[rows])


@dataclass
class DimensionChange:
    """The outcome of a densify/prune/reset: new tensors and how they relate to the old ones.

    Attributes:
        tensors: the new parameter tensors keyed by name (``PARAMETER_NAMES``).
        parents: ``[N_new]`` row of the old state each new row comes from (children point at parents).
        fresh: ``[N_new]`` True where the row is new (clone or split child): Adam moments start at zero.
        reset: names of tensors whose optimizer moments are zeroed entirely (opacity reset).
        stats: the statistics for the new rows.
    """

    tensors: dict[str, Tensor]
    parents: Tensor
    fresh: Tensor
    stats: DensificationStats
    reset: frozenset[str] = field(default_factory=frozenset)

    def unproject(self, old: Tensor) -> Tensor:
        """Map a per-Gaussian tensor of the old size (a gradient, a guess) onto the new rows."""
        return old[self.parents.to(old.device)]


def prune_mask(
    tensors: dict[str, Tensor], max_radii: Tensor, schedule: DensificationSchedule, extent: float
) -> Tensor:
    """Rows to delete: opacity below ``min_opacity``, or (with ``max_screen_size``) too large on screen or in the world."""
    mask = torch.sigmoid(tensors["opacity_logits"]) < schedule.min_opacity
    if schedule.max_screen_size:
        mask |= max_radii > schedule.max_screen_size
        mask |= torch.exp(tensors["log_scales"]).amax(dim=-1) > 0.1 * extent
    return mask


def densify_and_prune(
    tensors: dict[str, Tensor], stats: DensificationStats, step: int, schedule: DensificationSchedule
) -> DimensionChange:
    """Clone small and split large Gaussians with a large mean screen gradient, then prune.

    New row order follows 3DGS: surviving originals, then clones, then split children (the split
    originals are removed). Clones copy their parent; each of the ``split_children`` children is
    placed at parent + R·(s ⊙ ε), ε ~ N(0, I) from ``schedule.generator(step)``, with scales divided
    by 0.8·children. As in DreamGaussian/3DGS the statistics (and screen radii) are reset before
    the prune, so the screen-size criterion has no effect here (graphdeco-inria/gaussian-splatting#123);
    :func:`prune` uses the real radii.
    """
    means = tensors["means"]
    device, n = means.device, means.shape[0]
    scales = torch.exp(tensors["log_scales"])
    large_grad = stats.mean_grad().to(device) >= schedule.grad_threshold
    small = scales.amax(dim=-1) <= schedule.percent_dense * schedule.extent
    rows = torch.arange(n, device=device)
    cloned = rows[large_grad & small]
    split = rows[large_grad & ~small]
    k = schedule.split_children
    split_parents = split.repeat(k)
    parents = torch.cat([rows, cloned, split_parents])
    fresh = torch.cat(
        [
            torch.zeros(n, dtype=torch.bool, device=device),
            torch.ones(parents.shape[0] - n, dtype=torch.bool, device=device),
        ]
    )
    new = {name: tensors[name][parents] for name in PARAMETER_NAMES}

    if split_parents.numel():
        first_child = n + cloned.shape[0]
        eps = torch.randn(split_parents.shape[0], 3, generator=schedule.generator(step)).to(
            device, means.dtype
        )
        offsets = (
            quaternion_to_rotation(tensors["quats"][split_parents]) @ (eps * scales[split_parents])[..., None]
        )[..., 0]
        new["means"] = torch.cat([new["means"][:first_child], means[split_parents] + offsets])
        new["log_scales"] = torch.cat(
            [new["log_scales"][:first_child], torch.log(scales[split_parents] / (0.8 * k))]
        )

    keep = torch.ones(parents.shape[0], dtype=torch.bool, device=device)
    keep[split] = False
    keep &= ~prune_mask(new, torch.zeros(parents.shape[0], device=device), schedule, schedule.extent)
    return DimensionChange(
        tensors={name: t[keep] for name, t in new.items()},
        parents=parents[keep],
        fresh=fresh[keep],
        stats=DensificationStats.zeros(int(keep.sum()), device=device),
    )


def prune(
    tensors: dict[str, Tensor],
    stats: DensificationStats,
    schedule: DensificationSchedule,
    extent: float | None = None,
) -> DimensionChange:
    """Remove Gaussians by :func:`prune_mask` with the accumulated screen radii (DreamGaussian's final prune uses extent 1)."""
    extent = schedule.extent if extent is None else extent
    keep = ~prune_mask(tensors, stats.max_radii.to(tensors["means"].device), schedule, extent)
    rows = torch.arange(keep.shape[0], device=keep.device)[keep]
    return DimensionChange(
        tensors={name: t[keep] for name, t in tensors.items()},
        parents=rows,
        fresh=torch.zeros(rows.shape[0], dtype=torch.bool, device=keep.device),
        stats=stats.select(keep.to(stats.count.device)),
    )


def reset_opacity(
    tensors: dict[str, Tensor], stats: DensificationStats, max_opacity: float = 0.01
) -> DimensionChange:
    """Clamp every opacity to at most ``max_opacity``; the opacity's Adam moments restart from zero."""
    n = tensors["means"].shape[0]
    clamped = torch.minimum(
        tensors["opacity_logits"], inverse_sigmoid(torch.tensor(max_opacity)).to(tensors["means"])
    )
    return DimensionChange(
        tensors={**tensors, "opacity_logits": clamped},
        parents=torch.arange(n, device=tensors["means"].device),
        fresh=torch.zeros(n, dtype=torch.bool, device=tensors["means"].device),
        stats=stats,
        reset=frozenset({"opacity_logits"}),
    )


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    old: dict[str, torch.nn.Parameter],
    new: dict[str, torch.nn.Parameter],
    change: DimensionChange,
) -> None:
    """Point ``optimizer`` at the ``new`` parameters and resize its per-row state like DreamGaussian.

    Tensors in the state with one row per Gaussian (Adam's ``exp_avg``, ``exp_avg_sq``) are gathered
    through ``change.parents`` with fresh rows zeroed (all rows for tensors in ``change.reset``);
    scalar entries such as ``step`` are kept. State is copied, never aliased.
    """
    for name, old_param in old.items():
        new_param = new[name]
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old_param:
                    group["params"][i] = new_param
        state = optimizer.state.pop(old_param, None)
        if not state:
            continue
        resized = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == old_param.shape[0]:
                value = change.unproject(value).clone()
                if name in change.reset:
                    value.zero_()
                else:
                    value[change.fresh.to(value.device)] = 0
            elif torch.is_tensor(value):
                value = value.clone()
            resized[key] = value
        optimizer.state[new_param] = resized


class GaussianDensityControl:
    """Runs :class:`DensificationSchedule` on a :class:`~recipes.geometry.gaussians.Gaussians` and its optimizer.

    Call :meth:`observe` after each backward with the render's screen-space mean gradient and radii,
    then :meth:`after_optimizer_step` with the number of completed steps; this is the hook the Picard
    replay runs after the optimizer step of each step.
    """

    def __init__(self, schedule: DensificationSchedule | None = None) -> None:
        self.schedule = schedule or DensificationSchedule()
        self.stats: DensificationStats | None = None

    def observe(self, step: int, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> None:
        """Accumulate statistics of the view rendered at ``step`` (1-based) when the schedule collects them."""
        if not self.schedule.collects_statistics(step):
            return
        if self.stats is None or self.stats.count.shape[0] != means2d_grad.shape[0]:
            self.stats = DensificationStats.zeros(means2d_grad.shape[0], means2d_grad.device)
        self.stats = self.stats.accumulate(means2d_grad.detach(), radii.detach(), width, height)

    def after_optimizer_step(
        self, gaussians, optimizer: torch.optim.Optimizer, step: int
    ) -> list[DimensionChange]:
        """Densify/prune and reset opacity if the schedule says so at ``step``; returns the changes applied in order."""
        changes = []
        n = len(gaussians)
        stats = self.stats if self.stats is not None else DensificationStats.zeros(n, gaussians.means.device)
        if self.schedule.densifies_at(step):
            changes.append(densify_and_prune(_detached(gaussians), stats, step, self.schedule))
            self.apply(gaussians, optimizer, changes[-1])
        if self.schedule.resets_opacity_at(step):
            changes.append(
                reset_opacity(_detached(gaussians), self.stats or DensificationStats.zeros(len(gaussians)))
            )
            self.apply(gaussians, optimizer, changes[-1])
        return changes

    def apply(self, gaussians, optimizer: torch.optim.Optimizer | None, change: DimensionChange) -> None:
        """Load ``change`` into the module (new parameters) and the optimizer (resized state)."""
        old = gaussians.parameter_dict()
        new = gaussians.load_tensors(change.tensors)
        if optimizer is not None:
            remap_optimizer(optimizer, old, new, change)
        self.stats = change.stats


def _detached(gaussians) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in gaussians.parameter_dict().items()}
