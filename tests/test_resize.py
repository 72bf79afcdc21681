"""Resize events, lineages and unproj; Picard buffers in the window, without Lightning."""

import math

import pytest
import torch

from lightning_picard.buffers import ModuleBuffers
from lightning_picard.flat import FlatParameters
from lightning_picard.resize import ResizeEvent, check_parents, rebase, row_maps, unproject
from lightning_picard.snapshot import OptimizerSnapshot
from lightning_picard.window import PicardWindow


def _event(step, parents, rows_before, name="x"):
    return ResizeEvent(step, {name: torch.tensor(parents)}, {name: rows_before})


def test_identical_lineages_need_no_map():
    a = _event(3, [0, 1, 1], 2)
    assert row_maps((), ()) is None
    assert row_maps((a,), (a,)) is None
    assert row_maps((a,), (_event(3, [0, 1, 1], 2),)) is None, "equal events from different replays"


def test_a_guess_without_the_replays_densification_maps_children_to_parents():
    # Replay: rows 0..3, then row 1 pruned and rows 0 and 3 cloned: new rows [0, 2, 3, 0, 3].
    densify = _event(5, [0, 2, 3, 0, 3], 4)
    maps = row_maps(source=(), target=(densify,))
    assert maps["x"].tolist() == [0, 2, 3, 0, 3]
    guess = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    assert unproject(guess, maps["x"]).flatten().tolist() == [10.0, 12.0, 13.0, 10.0, 13.0]


def test_diverged_densifications_map_through_the_common_ancestor():
    # Both started from 3 rows. The guess cloned row 2 and pruned row 0: guess rows descend from [1, 2, 2].
    # The replay cloned row 0 twice: replay rows descend from [0, 1, 2, 0, 0].
    guess = (_event(4, [1, 2, 2], 3),)
    replay = (_event(4, [0, 1, 2, 0, 0], 3),)
    index = row_maps(source=guess, target=replay)["x"]
    # ancestor 0 was pruned in the guess: no source; ancestor 1 is guess row 0; ancestor 2 is guess row 1 (first).
    assert index.tolist() == [-1, 0, 1, -1, -1]
    values = unproject(torch.tensor([1.0, 2.0, 3.0]), index, missing=math.nan)
    assert values[1:3].tolist() == [1.0, 2.0] and math.isnan(values[0])


def test_successive_events_compose_and_rebase_drops_what_the_anchor_absorbed():
    first = _event(2, [0, 0, 1], 2)  # 2 rows -> 3
    second = _event(4, [2, 0], 3)  # 3 rows -> 2
    maps = row_maps((), (first, second))
    assert maps["x"].tolist() == [1, 0]
    assert rebase((first, second), 3) == (second,)
    assert rebase((first, second), 5) == ()
    assert row_maps((second,), rebase((first, second), 3)) is None


def test_check_parents_explains_bad_reports():
    with pytest.raises(ValueError, match="one parent per new row"):
        check_parents("x", torch.tensor([0, 1]), rows_before=2, rows_after=3, step=0)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        check_parents("x", torch.tensor([0, 2, 1]), rows_before=2, rows_after=3, step=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        check_parents("x", torch.tensor([0.0, 1.0, 1.0]), rows_before=2, rows_after=3, step=0)


class _Points(torch.nn.Module):
    """Points pulled towards a target; every 2 steps the first point is cloned (a resize in the replay)."""

    def __init__(self, in_error: bool):
        super().__init__()
        self.x = torch.nn.Parameter(torch.arange(3.0))
        self.register_buffer("seen", torch.zeros(()))
        self.in_error = in_error

    def grad(self, step):
        self.x.grad = self.x.detach() - 1.0 + 0.1 * step

    def after_step(self, optimizer, step):
        self.seen.fill_(step + 1)
        if (step + 1) % 2:
            return None
        parents = torch.cat([torch.arange(self.x.shape[0]), torch.tensor([0])])
        with torch.no_grad():
            state = optimizer.state[self.x]
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state[key][parents].clone()
                moment[-1] = 0
                state[key] = moment
            self.x.data = self.x.detach()[parents].clone()
        self.x.grad = None
        return {"x": parents}


def _train(module, optimizer, steps, window=None):
    """Sequential steps (``window=None``) or Picard rounds of ``window`` over ``module.grad`` and
    ``module.after_step``; returns the number of rounds."""
    if window is None:
        for s in range(steps):
            module.grad(s)
            optimizer.step()
            module.after_step(optimizer, s)
        return steps
    flat, snapshot = window.flat, OptimizerSnapshot(optimizer)
    tau = 0
    while tau < steps:
        n = min(window.window_size, steps - tau)
        rows = torch.zeros(n, flat.header + max(window.slot_numel(j) for j in range(n)))
        for j in range(n):
            window.load(j)
            module.grad(tau + j)
            flat.write_gradients(rows[j])
        window.load(0)

        def update(j, tau=tau):
            optimizer.step()
            return module.after_step(optimizer, tau + j)

        tau += window.run_round(tau, n, rows.__getitem__, update, snapshot).skip
    return window.rounds


def _run_points(window_size, steps=9, threshold=0.0, in_error=True):
    module = _Points(in_error)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    window = None
    if window_size is not None:
        flat = FlatParameters([module.x], ["x"])
        buffers = ModuleBuffers(module, {"seen": in_error})
        window = PicardWindow(flat, window_size, threshold, ema_decay=0.9, buffers=buffers)
    return module, _train(module, optimizer, steps, window)


@pytest.mark.parametrize("window_size", [1, 2, 3, 4])
def test_threshold_zero_with_resizes_in_the_replay_is_exact(window_size):
    reference, _ = _run_points(None)
    module, _ = _run_points(window_size)
    assert torch.equal(module.x, reference.x) and torch.equal(module.seen, reference.seen)
    assert module.x.shape == (7,)


def test_a_buffer_counts_in_the_error_only_when_declared_so():
    module = _Points(in_error=True)
    flat = FlatParameters([module.x], ["x"])
    for counted in (True, False):
        window = PicardWindow(flat, 2, 0.0, 0.9, buffers=ModuleBuffers(module, {"seen": counted}))
        window._row(1).buffers["seen"].fill_(5.0)  # the guess's buffer differs, its parameters do not
        module.x.grad = torch.zeros(3)
        result = window.run_round(
            0,
            1,
            lambda j: torch.zeros(1 + 3),
            lambda j: None,
            OptimizerSnapshot(torch.optim.SGD([module.x], lr=0.0)),
            [[True]],
        )
        assert (result.errors[0] > 0) == counted
        assert result.errors[0] == pytest.approx(25.0 / 4 if counted else 0.0)


def test_module_buffers_reject_unknown_names():
    with pytest.raises(ValueError, match="not a buffer of the module"):
        ModuleBuffers(_Points(True), {"missing": True})


class _PrunedAway(torch.nn.Module):
    """``x`` loses every row after step 1; ``b`` keeps training."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.arange(3.0))
        self.b = torch.nn.Parameter(torch.ones(2))

    def grad(self, step):
        self.x.grad = self.x.detach() * 0.5
        self.b.grad = self.b.detach() - step * 0.1 + self.x.detach().sum()

    def after_step(self, optimizer, step):
        if step != 1:
            return None
        parents = torch.zeros(0, dtype=torch.int64)
        state = optimizer.state[self.x]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key][parents].clone()
        self.x.data = self.x.detach()[parents].clone()
        self.x.grad = None
        return {"x": parents}


def _run_pruned(window_size, steps=6):
    module = _PrunedAway()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    window = None
    if window_size is not None:
        window = PicardWindow(
            FlatParameters([module.x, module.b], ["x", "b"]), window_size, 0.0, ema_decay=0.9
        )
    _train(module, optimizer, steps, window)
    return module


@pytest.mark.parametrize("window_size", [2, 3])
def test_a_parameter_pruned_to_zero_rows_stays_exact(window_size):
    reference = _run_pruned(None)
    module = _run_pruned(window_size)
    assert module.x.shape == (0,)
    assert torch.equal(module.b, reference.b)
