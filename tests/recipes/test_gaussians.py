"""3D Gaussians: DreamGaussian init and learning rates, the torch splatter, densify/prune with its index map,
and densification under Picard (in-place resizes, the resize report, an exact run against the sequential one)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_picard as lp
from recipes.data.cameras import cameras_from_spherical
from recipes.geometry.gaussian_density_control import (
    STATISTICS,
    DensificationSchedule,
    DensificationStats,
    GaussianDensityControl,
    densify_and_prune,
    prune,
    remap_optimizer,
    reset_opacity,
    resize_report,
)
from recipes.geometry.gaussians import (
    PARAMETER_NAMES,
    GaussianLearningRates,
    Gaussians,
    resize_rows_to_state_dict,
    rgb_to_sh_dc,
)
from recipes.render.gaussians_raster import (
    project_gaussians,
    rasterize_gaussians,
    render_gaussians,
    resolve_backend,
)
from tests.toy import quiet_trainer_kwargs


def one_camera(size: int = 32, distance: float = 2.0, fovy_deg: float = 40.0, elevation: float = 20.0):
    def full(value: float) -> torch.Tensor:
        return torch.tensor([value])

    return cameras_from_spherical(full(elevation), full(30.0), full(distance), full(fovy_deg), size, size)


def test_initialisation_follows_dreamgaussian():
    g = Gaussians(num_points=300, radius=0.5, seed=3)
    assert len(g) == 300
    assert g.means.norm(dim=-1).max() <= 0.5 + 1e-6
    assert g.means.norm(dim=-1).max() > 0.4  # fills the ball, not a shrunken core
    torch.testing.assert_close(g.opacities, torch.full((300,), 0.1))
    torch.testing.assert_close(g.rotations, torch.tensor([1.0, 0, 0, 0]).expand(300, 4))
    assert g.colors.max() <= 1 / 255 + 1e-6
    assert torch.all(g.log_scales[:, 0] == g.log_scales[:, 1])
    # scale = sqrt(mean squared distance to the 3 nearest neighbours)
    d2 = torch.cdist(g.means, g.means).square().fill_diagonal_(float("inf"))
    expected = d2.topk(3, dim=1, largest=False).values.mean(1).sqrt()
    torch.testing.assert_close(g.scales[:, 0], expected, rtol=1e-4, atol=1e-6)
    same = Gaussians(num_points=300, seed=3)
    assert torch.equal(same.means, g.means)
    assert not torch.equal(Gaussians(num_points=300, seed=4).means, g.means)


def test_learning_rates_and_position_decay():
    lrs = GaussianLearningRates()
    assert lrs.position_lr(0) == pytest.approx(0.01)
    assert lrs.position_lr(300) == pytest.approx(2e-4)
    assert lrs.position_lr(150) == pytest.approx(math.sqrt(0.01 * 2e-4))
    assert lrs.position_lr(10_000) == pytest.approx(2e-4)

    g = Gaussians(num_points=20)
    optimizer, scheduler = g.configure_optimizer(lrs)
    assert optimizer.defaults["eps"] == 1e-15
    lr_of = {group["name"]: group for group in optimizer.param_groups}
    assert {k: v["lr"] for k, v in lr_of.items() if k != "means"} == {
        "sh_dc": 0.01,
        "opacity_logits": 0.05,
        "log_scales": 0.005,
        "quats": 0.005,
    }
    seen = []
    for _ in range(3):
        seen.append(lr_of["means"]["lr"])
        g.means.sum().backward()
        optimizer.step()
        scheduler.step()
    # DreamGaussian sets lr(step) before optimizer step number `step` (1-based)
    assert seen == pytest.approx([lrs.position_lr(s) for s in (1, 2, 3)])
    assert lr_of["sh_dc"]["lr"] == 0.01


def test_gradients_reach_every_parameter():
    g = Gaussians(num_points=64, radius=0.4, seed=0)
    with torch.no_grad():
        g.opacity_logits.fill_(0.0)
        g.log_scales.add_(0.5)
        g.quats.add_(0.1 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    out = render_gaussians(g, one_camera(24), background=torch.ones(3))
    target = torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(1))
    ((out.rgb - target) ** 2).mean().add(out.depth.mean()).backward()
    for name in PARAMETER_NAMES:
        grad = getattr(g, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert out.means2d.grad is not None and out.means2d.grad.shape == (1, 64, 2)
    assert out.means2d.grad[out.radii == 0].abs().sum() == 0


def fibonacci_sphere(n: int, radius: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = torch.sqrt(1 - z * z)
    return (radius * torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)).float()


def test_sphere_of_gaussians_matches_the_disc_silhouette_and_colour():
    n, radius, sigma, size, distance, fovy = 1500, 0.5, 0.025, 40, 2.0, 40.0
    means = fibonacci_sphere(n, radius)
    cams = one_camera(size, distance, fovy)
    out = rasterize_gaussians(
        means,
        torch.tensor([1.0, 0, 0, 0]).expand(n, 4),
        torch.full((n, 3), sigma),
        torch.full((n,), 0.99),
        torch.tensor([1.0, 0.2, 0.1]).expand(n, 3),
        cams,
        background=torch.ones(3),
    )
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    # Gaussians centred on the sphere reach past it; along grazing rays many overlap, so the
    # alpha = 0.5 contour sits about two standard deviations outside the sphere.
    disc_radius = focal * math.tan(math.asin((radius + 2 * sigma) / distance))
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 <= disc_radius**2
    silhouette = out.alpha[0, ..., 0] > 0.5
    iou = (silhouette & disc).sum() / (silhouette | disc).sum()
    assert iou > 0.95
    inner = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 <= (0.8 * disc_radius) ** 2
    colour_error = (out.rgb[0][inner] - torch.tensor([1.0, 0.2, 0.1])).abs()
    assert (
        colour_error.max() < 0.06 and colour_error.mean() < 0.01
    )  # a little background leaks between splats
    far = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 >= (1.3 * disc_radius) ** 2
    torch.testing.assert_close(out.rgb[0][far], torch.ones(int(far.sum()), 3), atol=1e-3, rtol=0)
    # expected depth of the front surface is about distance − radius
    front = out.depth[0, size // 2, size // 2, 0] / out.alpha[0, size // 2, size // 2, 0]
    assert abs(front.item() - (distance - radius)) < 0.05


def toy_state(n: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "means": torch.randn(n, 3, generator=generator),
        "sh_dc": rgb_to_sh_dc(torch.rand(n, 3, generator=generator)),
        "opacity_logits": torch.full((n,), 2.0),
        "log_scales": torch.log(torch.tensor([0.01, 0.02, 0.2, 0.3, 0.01, 0.3, 0.01, 0.3]))[:n, None].repeat(
            1, 3
        ),
        "quats": torch.nn.functional.normalize(torch.randn(n, 4, generator=generator), dim=-1),
    }


def toy_stats(n: int = 8) -> DensificationStats:
    stats = DensificationStats.zeros(n)
    # rows 0, 1 (small) and 2, 3 (large) have large mean gradients; 4, 5 below threshold; 6, 7 unseen
    stats.grad_norm_sum = torch.tensor([0.05, 0.02, 0.03, 0.1, 0.001, 0.005, 0.0, 0.0])[:n]
    stats.count = torch.tensor([1.0, 1, 1, 2, 1, 1, 0, 0])[:n]
    return stats


def test_densify_clones_small_splits_large_and_maps_children_to_parents():
    state, stats = toy_state(), toy_stats()
    state["opacity_logits"][7] = -6.0  # opacity 0.0025 < 0.01: pruned
    schedule = DensificationSchedule(percent_dense=0.01, extent=4.0)  # clone if max scale <= 0.04
    change = densify_and_prune(state, stats, step=50, schedule=schedule)
    # survivors 0 1 4 5 6 (2, 3 are split away, 7 pruned), clones of 0 1, two children each of 2 3
    assert change.parents.tolist() == [0, 1, 4, 5, 6, 0, 1, 2, 3, 2, 3]
    assert change.fresh.tolist() == [False] * 5 + [True] * 6
    for name in ("sh_dc", "opacity_logits", "quats"):
        torch.testing.assert_close(change.tensors[name], state[name][change.parents])
    torch.testing.assert_close(change.tensors["means"][:7], state["means"][[0, 1, 4, 5, 6, 0, 1]])
    children = change.tensors["means"][7:]
    parent_means = state["means"][change.parents[7:]]
    parent_scale = torch.exp(state["log_scales"][change.parents[7:], 0])
    assert not torch.allclose(children, parent_means)
    assert ((children - parent_means).norm(dim=-1) < 5 * parent_scale).all()
    torch.testing.assert_close(
        change.tensors["log_scales"][7:], state["log_scales"][change.parents[7:]] - math.log(1.6)
    )
    assert change.stats.count.shape == (11,) and change.stats.count.sum() == 0
    grad_old = torch.arange(8.0)[:, None].expand(8, 3)
    torch.testing.assert_close(change.unproject(grad_old), grad_old[change.parents])


def test_densify_is_a_deterministic_function_of_state_stats_and_step():
    schedule = DensificationSchedule()
    a = densify_and_prune(toy_state(), toy_stats(), step=100, schedule=schedule)
    b = densify_and_prune(toy_state(), toy_stats(), step=100, schedule=schedule)
    c = densify_and_prune(toy_state(), toy_stats(), step=150, schedule=schedule)
    for name in PARAMETER_NAMES:
        assert torch.equal(a.tensors[name], b.tensors[name])
    assert torch.equal(a.parents, c.parents)
    assert not torch.equal(a.tensors["means"], c.tensors["means"])  # split offsets are seeded by the step
    # the global RNG is neither used nor consumed
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    densify_and_prune(toy_state(), toy_stats(), step=100, schedule=schedule)
    assert torch.equal(torch.rand(1), before)


def test_prune_uses_screen_radius_and_world_size():
    state, stats = toy_state(), toy_stats()
    stats.max_radii = torch.tensor([0.0, 0, 0, 0, 0, 0, 2.0, 0])
    change = prune(state, stats, DensificationSchedule(max_screen_size=1.0), extent=1.0)
    # world scale > 0.1 * extent drops 2, 3, 5, 7; screen radius drops 6
    assert change.parents.tolist() == [0, 1, 4]
    assert not change.fresh.any()


def stepped_gaussians() -> tuple[Gaussians, torch.optim.Adam]:
    """Gaussians holding :func:`toy_state` after one Adam step (so every parameter has moments)."""
    g = Gaussians(num_points=8)
    g.load_tensors(toy_state())
    optimizer, _ = g.configure_optimizer(GaussianLearningRates())
    for p in g.parameters():
        p.grad = torch.rand(p.shape, generator=torch.Generator().manual_seed(p.dim())) + 0.5
    optimizer.step()
    return g, optimizer


def test_load_tensors_resizes_in_place_copies_and_clears_gradients():
    g = Gaussians(num_points=8)
    before = g.parameter_dict()
    for p in g.parameters():
        p.grad = torch.ones_like(p)
    state = toy_state(5)
    returned = g.load_tensors(state)
    assert len(g) == 5 and returned.keys() == before.keys()
    assert all(returned[name] is before[name] for name in PARAMETER_NAMES)  # the same nn.Parameter objects
    for name in PARAMETER_NAMES:
        p = getattr(g, name)
        assert torch.equal(p, state[name]) and p.grad is None and p.requires_grad
        assert p.data_ptr() != state[name].data_ptr()  # copied, not aliased
    with pytest.raises(ValueError, match="different numbers"):
        g.load_tensors({**toy_state(5), "quats": toy_state(4)["quats"]})


def test_densify_keeps_the_parameters_and_resizes_the_optimizer_state_like_dreamgaussian():
    g, optimizer = stepped_gaussians()
    old = g.parameter_dict()
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in old.items()}
    control = GaussianDensityControl(DensificationSchedule(), num_points=8)
    control.stats = toy_stats()
    changes = control.after_optimizer_step(g, optimizer, step=50)
    assert len(changes) == 1
    change = changes[0]
    assert change.rows_before == 8
    new = g.parameter_dict()
    assert len(g) == 12 and all(p is old[n] for n, p in new.items())  # resized in place
    assert [group["params"][0] for group in optimizer.param_groups] == list(old.values())
    assert len(optimizer.state) == len(PARAMETER_NAMES)
    for name, p in new.items():
        state = optimizer.state[p]
        assert torch.equal(state["step"], old_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            kept = ~change.fresh
            assert torch.equal(state[key][kept], old_state[name][key][change.parents[kept]])
            assert old_state[name][key][change.parents[change.fresh]].abs().sum() > 0  # so zeroing shows
            assert state[key][change.fresh].abs().sum() == 0
            assert state[key].data_ptr() != old_state[name][key].data_ptr()
    g.means.sum().backward()
    optimizer.step()  # shapes line up after the surgery
    assert control.stats is not None and control.stats.count.shape == (12,)
    assert control.count.shape == (12,)  # the statistics are the module's buffers


def test_remap_optimizer_still_moves_state_onto_new_parameter_objects():
    g, optimizer = stepped_gaussians()
    old = g.parameter_dict()
    moments = {name: optimizer.state[p]["exp_avg"].clone() for name, p in old.items()}
    change = densify_and_prune(toy_state(), toy_stats(), step=50, schedule=DensificationSchedule())
    new = {name: torch.nn.Parameter(change.tensors[name].clone()) for name in PARAMETER_NAMES}
    remap_optimizer(optimizer, old, new, change)
    assert [group["params"][0] for group in optimizer.param_groups] == list(new.values())
    for name, p in new.items():
        assert old[name] not in optimizer.state
        expected = moments[name][change.parents]
        expected[change.fresh] = 0
        assert torch.equal(optimizer.state[p]["exp_avg"], expected)
    with pytest.raises(ValueError, match="once per change"):  # a second remap of the same change
        remap_optimizer(optimizer, new, new, change)


def test_resize_report_composes_successive_changes_like_applying_them_one_by_one():
    g, optimizer = stepped_gaussians()
    original = {name: t.detach().clone() for name, t in g.parameter_dict().items()}
    control = GaussianDensityControl(DensificationSchedule(), num_points=8)
    control.stats = toy_stats()
    schedule = DensificationSchedule()
    row_id = torch.arange(8.0) * 10 + 3  # any per-Gaussian tensor, carried through each change separately
    changes = []
    for make in (
        lambda t: densify_and_prune(t, control.stats, 50, schedule),
        lambda t: prune(t, control.stats, schedule, extent=1.0),  # drops the large ones, keeps some clones
        lambda t: reset_opacity(t, control.stats),
    ):
        changes.append(make({name: p.detach() for name, p in g.parameter_dict().items()}))
        control.apply_change(g, optimizer, changes[-1])
        row_id = changes[-1].unproject(row_id)
    assert [c.rows_before for c in changes] == [8, 12, len(g)] and 0 < len(g) < 12

    report = resize_report(changes, "gaussians.", "density.")
    assert set(report) == {f"gaussians.{n}" for n in PARAMETER_NAMES} | {f"density.{n}" for n in STATISTICS}
    parents = report["gaussians.means"]
    assert parents.dtype == torch.int64 and parents.shape == (len(g),)
    assert all(torch.equal(p, parents) for p in report.values())
    assert torch.equal(parents, changes[0].parents[changes[1].parents])  # the reset keeps rows in place
    assert torch.equal(torch.arange(8.0)[parents] * 10 + 3, row_id)
    for name in ("sh_dc", "quats"):  # only ever gathered, so they follow the composed parents
        assert torch.equal(getattr(g, name), original[name][parents])
    assert resize_report(changes[:2], "g.").keys() == {f"g.{n}" for n in PARAMETER_NAMES}
    assert torch.equal(resize_report(changes[:2], "g.")["g.quats"], parents)


def test_resize_report_is_empty_when_no_row_moves():
    state = toy_state()
    reset = reset_opacity(state, toy_stats())
    nothing = densify_and_prune(state, DensificationStats.zeros(8), 50, DensificationSchedule(extent=100.0))
    assert nothing.keeps_rows and reset.keeps_rows
    assert resize_report([], "gaussians.") == {}
    assert resize_report([nothing, reset], "gaussians.", "density.") == {}
    # the same number of rows in another order is a change
    swapped = prune(state, toy_stats(), DensificationSchedule(), extent=100.0)
    swapped.parents = swapped.parents.flip(0)
    assert not swapped.keeps_rows and len(resize_report([swapped], "g.")) == len(PARAMETER_NAMES)


class _Holder(torch.nn.Module):
    def __init__(self, num_points: int, seed: int) -> None:
        super().__init__()
        self.gaussians = Gaussians(num_points=num_points, seed=seed)
        self.density = GaussianDensityControl(num_points=num_points)


def test_a_state_dict_with_another_number_of_gaussians_loads_in_place():
    small, big = _Holder(5, seed=0), _Holder(9, seed=1)
    big.density.stats = DensificationStats(torch.rand(9), torch.ones(9), torch.rand(9))
    parameters = dict(small.named_parameters())
    for p in small.parameters():
        p.grad = torch.ones_like(p)
    small.load_state_dict(big.state_dict())
    assert len(small.gaussians) == 9
    for name, p in small.named_parameters():
        assert p is parameters[name] and p.grad is None
        assert torch.equal(p, big.get_parameter(name))
    for name, b in small.named_buffers():
        assert torch.equal(b, big.get_buffer(name))
    with pytest.raises(RuntimeError, match="size mismatch"):  # other mismatches are still reported
        small.gaussians.load_state_dict({**big.gaussians.state_dict(), "quats": torch.zeros(9, 3)})


STEPS = 12
SIZE = 16
SCREEN_OUTPUTS = ("screen_grad", "screen_radii")


class SplatFit(pl.LightningModule):
    """40 Gaussians splatted into one of two 16×16 views per step and fit to fixed random images.

    DreamGaussian's densification statistic, the gradient of the loss w.r.t. the projected 2D means and the
    screen radii of the view, is recorded by ``training_step`` (the radii) and by a tensor hook on
    ``means2d`` during Lightning's backward (the gradient) into the buffers ``screen_grad [N, 2]`` and
    ``screen_radii [N]``, declared as step outputs. The step hook observes them (1-based step), then
    densifies/prunes every 3 steps and resets the opacity at step 9; it resizes the step outputs to zeros
    of the new size and reports them with the Gaussians and the statistics. The view and the background
    colour are drawn per step (seeded by the strategy or ``StepSeed``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gaussians = Gaussians(num_points=40, radius=0.5, init_opacity=0.5, seed=0)
        n = len(self.gaussians)
        schedule = DensificationSchedule(
            interval=3, opacity_reset_interval=9, grad_threshold=0.004, percent_dense=0.0375
        )
        self.density = GaussianDensityControl(schedule, num_points=n)
        self.register_buffer("screen_grad", torch.zeros(n, 2))
        self.register_buffer("screen_radii", torch.zeros(n))
        self.register_buffer(
            "targets", torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
        )
        full = torch.ones(2)
        self.cameras = cameras_from_spherical(
            20 * full, torch.tensor([0.0, 90.0]), 2 * full, 40 * full, SIZE, SIZE
        )
        self.register_load_state_dict_pre_hook(resize_rows_to_state_dict)  # the step outputs' row count
        self.densifications: list[tuple[int, int, int, int, int]] = []
        """(1-based step, Gaussians before, cloned, split, pruned) of every densify/prune."""

    def picard_buffers(self) -> dict[str, bool]:
        return self.density.statistics_buffers("density.")

    def picard_step_outputs(self) -> list[str]:
        return list(SCREEN_OUTPUTS)

    def training_step(self, batch, batch_idx):
        view = int(torch.randint(2, ()))
        out = render_gaussians(self.gaussians, self.cameras[view : view + 1], background=torch.rand(3))
        self.screen_radii.copy_(out.radii[-1])
        out.means2d.register_hook(self._record_screen_gradient)
        return (out.rgb[-1] - self.targets[view]).square().mean()

    def _record_screen_gradient(self, grad: torch.Tensor) -> None:
        self.screen_grad.copy_(grad[-1])  # runs during Lightning's backward

    def configure_optimizers(self):
        optimizer, scheduler = self.gaussians.configure_optimizer(
            GaussianLearningRates(position_lr_max_steps=STEPS)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def picard_after_optimizer_step(self, step: int) -> dict[str, torch.Tensor]:
        g, density = self.gaussians, self.density
        density.observe(step + 1, self.screen_grad, self.screen_radii, SIZE, SIZE)
        before, counts = len(g), self._clone_and_split_counts(step + 1)
        changes = density.after_optimizer_step(g, self.optimizers(use_pl_optimizer=False), step + 1)
        if counts is not None:
            cloned, split = counts
            self.densifications.append((step + 1, before, cloned, split, before + cloned + split - len(g)))
        report = resize_report(changes, "gaussians.", "density.", also=SCREEN_OUTPUTS)
        if report:
            self.screen_grad = self.screen_grad.new_zeros(len(g), 2)
            self.screen_radii = self.screen_radii.new_zeros(len(g))
        return report

    def _clone_and_split_counts(self, step: int) -> tuple[int, int] | None:
        """How many Gaussians the densification at ``step`` clones and splits (``None`` if it does not run)."""
        schedule, stats = self.density.schedule, self.density.stats
        if not schedule.densifies_at(step):
            return None
        large = stats.mean_grad() >= schedule.grad_threshold
        small = self.gaussians.scales.amax(dim=-1) <= schedule.percent_dense * schedule.extent
        return int((large & small).sum()), int((large & ~small).sum())


class _StepOutputsNotDeclared(SplatFit):
    """The screen statistics as mere Picard buffers: the replay reads the anchor's, not the evaluated step's."""

    def picard_step_outputs(self) -> list[str]:
        return []

    def picard_buffers(self) -> dict[str, bool]:
        return {**super().picard_buffers(), **dict.fromkeys(SCREEN_OUTPUTS, False)}


def _fit(strategy=None, callbacks=(), devices=1, module_class=SplatFit) -> tuple[SplatFit, pl.Trainer]:
    module = module_class()
    data = DataLoader(TensorDataset(torch.arange(STEPS, dtype=torch.float32)), batch_size=1)
    kwargs = quiet_trainer_kwargs(devices=devices, max_steps=STEPS, callbacks=list(callbacks))
    trainer = pl.Trainer(**kwargs) if strategy is None else pl.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, data)
    return module, trainer


def _assert_same_state(a: pl.LightningModule, b: pl.LightningModule) -> None:
    ours = dict([*a.named_parameters(), *a.named_buffers()])
    theirs = dict([*b.named_parameters(), *b.named_buffers()])
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def sequential_fit() -> tuple[SplatFit, pl.Trainer]:
    return _fit(callbacks=[lp.StepSeed(0)])


def test_the_splatted_fit_clones_splits_and_prunes_on_screen_statistics(sequential_fit):
    sequential, _ = sequential_fit
    # (step, Gaussians before, cloned, split, pruned); today (3, 40, 0, 13, 0), (6, 53, 0, 3, 0), (9, 56, 4, 2, 0)
    # and (12, 62, 0, 0, 5): splits at 3, 6, 9, clones at 9 (then the opacity reset, one report for both), and
    # the prune at 12 of Gaussians that the reset left transparent
    steps, _, cloned, split, pruned = zip(*sequential.densifications)
    assert steps == (3, 6, 9, 12)
    assert sum(cloned) > 0 and sum(split) > 0 and pruned[-1] > 0
    n = len(sequential.gaussians)
    assert n != 40 and sequential.screen_grad.shape == (n, 2) and sequential.screen_radii.shape == (n,)


def test_densification_on_screen_statistics_under_picard_reproduces_the_sequential_run_bit_for_bit(
    sequential_fit,
):
    sequential, sequential_trainer = sequential_fit
    picard, trainer = _fit(strategy=lp.PicardStrategy(window_size=3, threshold=0.0))
    assert trainer.global_step == STEPS
    assert picard.densifications[-1] == sequential.densifications[-1]  # the replay ran the densifications
    _assert_same_state(picard, sequential)  # parameters, statistics, step outputs
    optimizer, sequential_optimizer = trainer.optimizers[0], sequential_trainer.optimizers[0]
    for p, q in zip(picard.gaussians.parameters(), sequential.gaussians.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], sequential_optimizer.state[q][key])


def test_without_declaring_the_step_outputs_the_run_is_not_exact(sequential_fit):
    """As Picard buffers the screen statistics travel with the rows, but the replay reads the anchor's
    copy, not what ``training_step`` wrote for the step: the densifications never see a gradient."""
    undeclared, _ = _fit(
        strategy=lp.PicardStrategy(window_size=3, threshold=0.0), module_class=_StepOutputsNotDeclared
    )
    assert [(step, cloned, split) for step, _, cloned, split, _ in undeclared.densifications] != [
        (step, cloned, split) for step, _, cloned, split, _ in sequential_fit[0].densifications
    ]
    with pytest.raises(AssertionError):
        _assert_same_state(undeclared, sequential_fit[0])


@pytest.mark.multiprocess
def test_two_ranks_densify_exactly_and_load_the_resized_weights_back(sequential_fit):
    # the fork launcher loads rank 0's final weights (another number of Gaussians) into this process's module
    picard, _ = _fit(strategy=lp.PicardStrategy(window_size=4, threshold=0.0, start_method="fork"), devices=2)
    _assert_same_state(picard, sequential_fit[0])


def test_resize_report_also_names_step_outputs():
    state = toy_state()
    change = prune(state, toy_stats(), DensificationSchedule(), extent=1.0)
    report = resize_report([change], "gaussians.", "density.", also=SCREEN_OUTPUTS)
    assert set(report) == (
        {f"gaussians.{n}" for n in PARAMETER_NAMES}
        | {f"density.{n}" for n in STATISTICS}
        | set(SCREEN_OUTPUTS)
    )
    assert all(parents is report["gaussians.means"] for parents in report.values())
    assert resize_report([reset_opacity(state, toy_stats())], "gaussians.", also=SCREEN_OUTPUTS) == {}


def test_schedule_collects_densifies_and_resets_on_dreamgaussian_steps():
    schedule = DensificationSchedule(start_step=100, end_step=400, interval=100, opacity_reset_interval=300)
    assert [s for s in range(0, 500, 50) if schedule.densifies_at(s)] == [100, 200, 300, 400]
    assert [s for s in range(0, 500, 50) if schedule.resets_opacity_at(s)] == [300]
    assert not schedule.collects_statistics(99)
    state = toy_state()
    change = reset_opacity(state, toy_stats())
    assert torch.sigmoid(change.tensors["opacity_logits"]).max() <= 0.01 + 1e-6
    assert change.reset == {"opacity_logits"} and change.parents.tolist() == list(range(8))


def test_density_control_observes_render_gradients():
    g = Gaussians(num_points=32, radius=0.3)
    with torch.no_grad():
        g.opacity_logits.fill_(1.0)
    out = render_gaussians(g, one_camera(16))
    out.rgb.sum().backward()
    control = GaussianDensityControl(DensificationSchedule(start_step=1))
    control.observe(0, out.means2d.grad[0], out.radii[0], 16, 16)
    assert control.stats is None  # step 0 is before start_step
    control.observe(1, out.means2d.grad[0], out.radii[0], 16, 16)
    visible = out.radii[0] > 0
    assert torch.equal(control.stats.count, visible.float())
    expected = (out.means2d.grad[0] * 8).norm(dim=-1)[visible]
    torch.testing.assert_close(control.stats.grad_norm_sum[visible], expected)


def test_backend_setting():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("cuda-magic", torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_gsplat_matches_torch_reference():
    pytest.importorskip("gsplat")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = Gaussians(num_points=500, radius=0.4).cuda()
    with torch.no_grad():
        g.opacity_logits.fill_(0.5)
    cams = one_camera(64).to("cuda")
    fast = render_gaussians(g, cams, torch.ones(3, device="cuda"), backend="gsplat")
    ref = render_gaussians(g, cams, torch.ones(3, device="cuda"), backend="torch")
    assert (fast.rgb - ref.rgb).abs().mean() < 1e-2
    assert (fast.alpha - ref.alpha).abs().mean() < 1e-2


def test_init_color_gives_every_gaussian_one_colour_and_keeps_the_positions():
    grey = Gaussians(num_points=50, seed=3, init_color=0.5)
    torch.testing.assert_close(grey.colors, torch.full((50, 3), 0.5))
    assert torch.equal(grey.means, Gaussians(num_points=50, seed=3).means)
    with pytest.raises(ValueError, match="init_color"):
        Gaussians(num_points=5, init_color=1.5)


@pytest.mark.parametrize("compositor", ["fused", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_compositors_match_the_dense_one_in_values_and_gradients(dtype, compositor):
    """Random Gaussians, some nearly opaque (α clamped at 0.99), some off screen, 20 × 20 pixels (partial
    8 × 8 tiles): same images, same gradients."""
    generator = torch.Generator().manual_seed(5)
    g = Gaussians(num_points=120, radius=0.6, seed=2)
    with torch.no_grad():
        g.sh_dc.add_(torch.randn(g.sh_dc.shape, generator=generator))
        g.opacity_logits.add_(3 * torch.randn(g.opacity_logits.shape, generator=generator))
        g.log_scales.add_(0.4 * torch.randn(g.log_scales.shape, generator=generator))
        g.quats.add_(0.3 * torch.randn(g.quats.shape, generator=generator))
        g.means[:5] += 3.0  # off screen: culled
        g.opacity_logits[5:15] = 6.0  # nearly opaque and wide: α = o·G is clamped at 0.99 near their centres
        g.log_scales[5:15] += 1.0
    g = g.to(dtype)
    cams = one_camera(20, distance=2.0)
    cams = cams.__class__(**{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in vars(cams).items()})
    weights = [torch.randn(1, 20, 20, c, generator=generator).to(dtype) for c in (3, 1, 1)]
    results = {}
    for name in ("dense", compositor):
        g.zero_grad()
        out = render_gaussians(g, cams, background=torch.ones(3, dtype=dtype), compositor=name)
        loss = sum((image * w).sum() for image, w in zip((out.rgb, out.alpha, out.depth), weights))
        loss.backward()
        results[name] = [out.rgb, out.alpha, out.depth, out.means2d.grad] + [
            getattr(g, name).grad for name in PARAMETER_NAMES
        ]
    means2d, conics, _, radii = project_gaussians(g.means, g.rotations, g.scales, cams)
    ys, xs = torch.meshgrid(torch.arange(20) + 0.5, torch.arange(20) + 0.5, indexing="ij")
    dx = xs.reshape(-1).to(dtype)[None] - means2d[0, :, :1]
    dy = ys.reshape(-1).to(dtype)[None] - means2d[0, :, 1:]
    a, b, c = conics[0].unbind(-1)
    power = -0.5 * (a[:, None] * dx**2 + c[:, None] * dy**2) - b[:, None] * dx * dy
    assert ((g.opacities[:, None] * power.exp() > 0.99) & (radii[0, :, None] > 0)).any()  # the clamp is hit
    # Float rounding only: float64 agrees to ~1e-15, float32 to ~1e-6 of each tensor's largest entry.
    relative = 1e-12 if dtype == torch.float64 else 2e-5
    for fast, dense in zip(results[compositor], results["dense"]):
        scale = dense.abs().max().item()
        torch.testing.assert_close(fast.detach(), dense.detach(), rtol=0.0, atol=relative * scale)
    with pytest.raises(ValueError, match="compositor"):
        render_gaussians(g, cams, compositor="sparse")


@pytest.mark.parametrize("compositor", ["dense", "fused", "tiled"])
def test_compositors_handle_a_view_with_nothing_visible(compositor):
    g = Gaussians(num_points=10, radius=0.3, seed=0)
    with torch.no_grad():
        g.means += 50.0  # behind or beside every camera
    out = render_gaussians(g, one_camera(12), background=torch.ones(3), compositor=compositor)
    assert torch.equal(out.rgb, torch.ones_like(out.rgb)) and torch.equal(
        out.alpha, torch.zeros_like(out.alpha)
    )
    out.rgb.sum().backward()
    assert g.means.grad is not None and g.means.grad.abs().sum() == 0
