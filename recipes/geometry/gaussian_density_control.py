"""Densify (clone/split), prune and opacity reset of 3D Gaussians on DreamGaussian's schedule.

Everything here is a deterministic function of (tensors, statistics, step): the only randomness, the
offsets of split children, comes from a generator seeded by ``(seed, step)``. Each operation returns
the new tensors together with the parent index map ``parents`` (row i of the new state descends from
row ``parents[i]`` of the old one) and the rows whose Adam moments restart from zero, so a Picard
replay can map gradients and guesses of the old size onto the new one (``old[parents]``) and resize
the optimizer state exactly as DreamGaussian does (kept rows keep their moments, new rows get zeros).

Under ``lightning_picard`` a LightningModule runs :meth:`GaussianDensityControl.after_optimizer_step` in
its ``picard_after_optimizer_step`` hook and returns :func:`resize_report` of the changes: the parameters
are resized in place, the densification statistics are module buffers that the module declares in
``picard_buffers()`` (:meth:`GaussianDensityControl.statistics_buffers`), and the screen-space gradient and
radii that feed them are step outputs (``picard_step_outputs()``) recorded by ``training_step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recipes.geometry.gaussians import (
    PARAMETER_NAMES,
    inverse_sigmoid,
    quaternion_to_rotation,
    resize_rows_to_state_dict,
)

STATISTICS = ("grad_norm_sum", "count", "max_radii")
"""Names of the per-Gaussian statistics (:class:`DensificationStats` fields, buffers of :class:`GaussianDensityControl`)."""


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
        rows_before: number of Gaussians before the change (``None`` if unknown).
    """

    tensors: dict[str, Tensor]
    parents: Tensor
    fresh: Tensor
    stats: DensificationStats
    reset: frozenset[str] = field(default_factory=frozenset)
    rows_before: int | None = None

    @property
    def keeps_rows(self) -> bool:
        """Whether every row stays where it was (``parents`` is the identity), as in an opacity reset."""
        return _is_identity(self.parents, self.rows_before)

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
        rows_before=n,
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
        rows_before=keep.shape[0],
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
        rows_before=n,
    )


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    old: Mapping[str, nn.Parameter],
    new: Mapping[str, nn.Parameter],
    change: DimensionChange,
) -> None:
    """Resize ``optimizer``'s per-row state of the Gaussians' parameters like DreamGaussian.

    ``old`` and ``new`` are :meth:`~recipes.geometry.gaussians.Gaussians.parameter_dict` before and after
    ``change`` was loaded. With :meth:`~recipes.geometry.gaussians.Gaussians.load_tensors`, which resizes in
    place, both hold the same ``nn.Parameter`` objects and the state stays keyed by them: this is what the
    Picard protocol requires. (If ``new`` holds other objects, the param groups are pointed at them and the
    state moves over.)

    State tensors with one row per Gaussian (shaped like the parameter apart from dim 0, with
    ``change.rows_before`` rows: Adam's ``exp_avg``, ``exp_avg_sq``) are gathered through ``change.parents``
    with fresh rows zeroed (all rows for tensors in ``change.reset``); other entries such as ``step`` are
    kept. The state is copied, never aliased.
    """
    for name, old_param in old.items():
        new_param = new[name]
        if new_param is not old_param:
            for group in optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old_param:
                        group["params"][i] = new_param
        state = optimizer.state.pop(old_param, None)
        if not state:
            continue
        resized = {}
        for key, value in state.items():
            if _per_row(value, new_param):
                if change.rows_before is not None and value.shape[0] != change.rows_before:
                    raise ValueError(
                        f"The optimizer state {key!r} of {name!r} has {value.shape[0]} rows but the change "
                        f"starts from {change.rows_before} Gaussians: remap the optimizer once per change, "
                        "right after loading it."
                    )
                value = change.unproject(value)  # advanced indexing: a copy
                if name in change.reset:
                    value.zero_()
                else:
                    value[change.fresh.to(value.device)] = 0
            elif torch.is_tensor(value):
                value = value.clone()
            resized[key] = value
        optimizer.state[new_param] = resized


def resize_report(
    changes: Sequence[DimensionChange],
    prefix: str = "",
    stats_prefix: str | None = None,
    also: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The ``{name: parents}`` that ``picard_after_optimizer_step`` returns for ``changes`` applied in order.

    The parents of successive changes compose (``parents_first[parents_second]``), so the report relates
    the rows after the last change to those before the first. The names are ``prefix + name`` for every
    tensor in :data:`~recipes.geometry.gaussians.PARAMETER_NAMES` (``prefix`` is the Gaussians' path in the
    LightningModule followed by a dot, e.g. ``"gaussians."``) and, with ``stats_prefix``, ``stats_prefix +
    name`` for the statistics buffers of :class:`GaussianDensityControl` (:data:`STATISTICS`), which are
    resized with the rows. ``also`` adds further names, in full, of per-Gaussian tensors that follow the rows:
    typically the LightningModule's step outputs (``picard_step_outputs()``: the screen-space gradient and
    radii that ``training_step`` records), which the hook resizes itself. All names share one int64 tensor.

    Returns ``{}`` when the rows did not change: no change, or only changes that keep every row in place
    such as the opacity reset (a value change needs no report).
    """
    if not changes:
        return {}
    parents = changes[0].parents
    for change in changes[1:]:
        parents = parents[change.parents.to(parents.device)]
    if _is_identity(parents, changes[0].rows_before):
        return {}
    parents = parents.to(torch.int64)
    names = [prefix + name for name in PARAMETER_NAMES]
    if stats_prefix is not None:
        names += [stats_prefix + name for name in STATISTICS]
    return dict.fromkeys([*names, *also], parents)


class GaussianDensityControl(nn.Module):
    """Runs :class:`DensificationSchedule` on a :class:`~recipes.geometry.gaussians.Gaussians` and its optimizer.

    Call :meth:`observe` after each backward with the render's screen-space mean gradient and radii,
    then :meth:`after_optimizer_step` with the number of completed steps. Under Picard both go in the
    module's ``picard_after_optimizer_step`` (the replay runs it; ``training_step`` runs on guesses and
    is not replayed). The screen-space gradient and radii come from ``training_step``: record them there in
    buffers that the module declares as step outputs (``picard_step_outputs()``), which Picard gathers with
    each step's gradient and puts back before replaying that step, and observe them in the hook; report
    them in :func:`resize_report` (``also=``) and resize them with the Gaussians.

    The statistics are the buffers :data:`STATISTICS` of this module (``[N]`` each; :attr:`stats` views
    them), so a LightningModule that holds the control as a submodule can declare them as Picard state
    (:meth:`statistics_buffers`); they are also saved in its checkpoints, and a state dict with another
    number of Gaussians loads.

    Args:
        schedule: when to densify, prune and reset; DreamGaussian's defaults if ``None``.
        num_points: number of Gaussians to size the statistics for. Under Picard pass ``len(gaussians)``:
            the buffers must not change size outside a reported resize. With 0 they are sized by the
            first :meth:`observe`.
    """

    grad_norm_sum: Tensor
    count: Tensor
    max_radii: Tensor

    def __init__(self, schedule: DensificationSchedule | None = None, num_points: int = 0) -> None:
        super().__init__()
        self.schedule = schedule or DensificationSchedule()
        for name in STATISTICS:
            self.register_buffer(name, torch.zeros(num_points))
        self.register_load_state_dict_pre_hook(resize_rows_to_state_dict)

    @property
    def stats(self) -> DensificationStats | None:
        """The statistics (views of the buffers), or ``None`` while they have no rows."""
        if self.count.shape[0] == 0:
            return None
        return DensificationStats(self.grad_norm_sum, self.count, self.max_radii)

    @stats.setter
    def stats(self, stats: DensificationStats | None) -> None:
        """Copy ``stats`` into the buffers (in place when shape, dtype and device agree); ``None`` empties them."""
        for name in STATISTICS:
            current = getattr(self, name)
            value = current.new_zeros(0) if stats is None else getattr(stats, name).detach()
            if (
                value.shape == current.shape
                and value.dtype == current.dtype
                and value.device == current.device
            ):
                if value is not current:
                    current.copy_(value)
            else:
                setattr(self, name, value.clone())

    def statistics_buffers(self, prefix: str = "", in_error: bool = True) -> dict[str, bool]:
        """``{prefix + name: in_error}`` for the statistics buffers: merge into ``picard_buffers()``.

        ``prefix`` is this module's path in the LightningModule followed by a dot (e.g. ``"density."``).
        """
        return {prefix + name: in_error for name in STATISTICS}

    def observe(self, step: int, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> None:
        """Accumulate statistics of the view rendered at ``step`` (1-based) when the schedule collects them."""
        if not self.schedule.collects_statistics(step):
            return
        stats = self.stats
        if stats is None or stats.count.shape[0] != means2d_grad.shape[0]:
            stats = DensificationStats.zeros(means2d_grad.shape[0], means2d_grad.device)
        self.stats = stats.accumulate(means2d_grad.detach(), radii.detach(), width, height)

    def after_optimizer_step(
        self, gaussians, optimizer: torch.optim.Optimizer, step: int
    ) -> list[DimensionChange]:
        """Densify/prune and reset opacity if the schedule says so at ``step``; returns the changes applied in order.

        Pass the changes to :func:`resize_report` for the Picard hook's return value.
        """
        changes = []
        if self.schedule.densifies_at(step):
            stats = self._stats_for(gaussians)
            changes.append(densify_and_prune(_detached(gaussians), stats, step, self.schedule))
            self.apply_change(gaussians, optimizer, changes[-1])
        if self.schedule.resets_opacity_at(step):
            changes.append(reset_opacity(_detached(gaussians), self._stats_for(gaussians)))
            self.apply_change(gaussians, optimizer, changes[-1])
        return changes

    def _stats_for(self, gaussians) -> DensificationStats:
        """The statistics, or zeros when there are none for the current number of Gaussians."""
        stats = self.stats
        if stats is None or stats.count.shape[0] != len(gaussians):
            return DensificationStats.zeros(len(gaussians), gaussians.means.device)
        return stats

    def apply_change(
        self, gaussians, optimizer: torch.optim.Optimizer | None, change: DimensionChange
    ) -> None:
        """Load ``change`` into the Gaussians (in place, same parameters), the optimizer (resized state) and
        the statistics. (Not named ``apply``: that is ``nn.Module.apply``.)"""
        old = gaussians.parameter_dict()
        new = gaussians.load_tensors(change.tensors)
        if optimizer is not None:
            remap_optimizer(optimizer, old, new, change)
        self.stats = change.stats


def _per_row(value: object, param: Tensor) -> bool:
    """Whether an optimizer state entry has one row per Gaussian (shaped like ``param`` apart from dim 0)."""
    return torch.is_tensor(value) and value.dim() == param.dim() > 0 and value.shape[1:] == param.shape[1:]


def _is_identity(parents: Tensor, rows_before: int | None) -> bool:
    """Whether ``parents`` keeps ``rows_before`` rows in place (``False`` when ``rows_before`` is unknown)."""
    if rows_before is None or parents.shape[0] != rows_before:
        return False
    return bool(torch.equal(parents, torch.arange(rows_before, device=parents.device)))


def _detached(gaussians) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in gaussians.parameter_dict().items()}
