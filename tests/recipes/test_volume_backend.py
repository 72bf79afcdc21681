"""The volume renderer's ``backend`` switch: torch (reference, default) and nerfacc (CUDA, optional)."""

import importlib.util
import logging
import types

import pytest
import torch
from torch import nn

from recipes.data.cameras import orbit_cameras
from recipes.geometry.nerf import FieldOutput, ImplicitVolumeConfig
from recipes.render.background import SolidColorBackground, SolidColorConfig
from recipes.render.materials import NoMaterial
from recipes.render.occupancy import OccupancyGridConfig
from recipes.render.volume import (
    VolumeRenderer,
    VolumeRendererConfig,
    ray_box_intersection,
    sample_along_rays,
)

HAS_NERFACC = importlib.util.find_spec("nerfacc") is not None


class Ball(nn.Module):
    """A soft ball of radius 0.5 with a constant colour."""

    def __init__(self) -> None:
        super().__init__()
        self.radius = 1.0
        self.logits = nn.Parameter(torch.logit(torch.tensor([0.8, 0.3, 0.1])))
        self.config = ImplicitVolumeConfig(radius=1.0, normal_type="analytic")

    def density(self, points):
        return 200.0 * torch.sigmoid(400.0 * (0.5 - points.norm(dim=-1)))

    def forward(self, points, with_normal=False):
        normal = nn.functional.normalize(points, dim=-1) if with_normal else None
        return FieldOutput(
            features=self.logits.expand(points.shape[0], 3), density=self.density(points), normal=normal
        )


def _renderer(backend="torch", occupancy=True):
    config = VolumeRendererConfig(
        num_samples_per_ray=64, occupancy=OccupancyGridConfig(enabled=occupancy), backend=backend
    )
    background = SolidColorBackground(SolidColorConfig((0.0, 0.0, 1.0)))
    return VolumeRenderer(Ball(), NoMaterial(), background, config)


def test_torch_is_the_default_backend_and_choice_is_logged_once(caplog):
    import recipes.geometry.backend as backend

    assert VolumeRendererConfig().backend == "torch"
    backend._logged.discard(("volume renderer", "torch"))
    with caplog.at_level(logging.INFO, logger="recipes"):
        assert _renderer()._nerfacc is None
        _renderer()
    assert [r.getMessage() for r in caplog.records].count("volume renderer backend: torch") == 1
    with pytest.raises(ValueError, match="unknown volume renderer backend"):
        _renderer(backend="tcnn")


@pytest.mark.skipif(HAS_NERFACC, reason="nerfacc is installed")
def test_nerfacc_backend_without_the_package_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check
    with pytest.raises(ImportError, match=r"nerfacc.*pip install nerfacc"):
        _renderer(backend="nerfacc")


def _fake_nerfacc(renderer):
    """A pure-torch stand-in following nerfacc 0.5's documented semantics (intervals of one step from the
    box entry, kept where the midpoint's cell is occupied; packed weights and sums)."""
    module = types.ModuleType("nerfacc")

    class OccGridEstimator(nn.Module):
        def __init__(self, roi_aabb, resolution, levels):
            super().__init__()
            self.radius = roi_aabb[3]
            self.register_buffer("binaries", torch.zeros(levels, resolution, resolution, resolution).bool())

        def sampling(self, rays_o, rays_d, render_step_size, stratified, cone_angle, alpha_thre):
            near, far = ray_box_intersection(rays_o, rays_d, self.radius)
            n = int(2 * 3**0.5 * self.radius / render_step_size) + 2
            t, mask = sample_along_rays(near, far, render_step_size, n, torch.full_like(near, 0.5))
            points = rays_o[:, None] + t[..., None] * rays_d[:, None]
            mask = mask & renderer.occupancy_grid.occupied(points)
            ray_index = torch.nonzero(mask)[:, 0].int()
            return ray_index, t[mask] - 0.5 * render_step_size, t[mask] + 0.5 * render_step_size

    def render_weight_from_alpha(alphas, ray_indices, n_rays):
        log_t = torch.log1p(-alphas.clamp(max=1 - 1e-7))
        exclusive = torch.cumsum(log_t, 0) - log_t
        first = torch.searchsorted(ray_indices.contiguous(), ray_indices)  # each ray's first sample
        trans = torch.exp(exclusive - exclusive[first])
        return trans * alphas, trans

    def accumulate_along_rays(weights, values, ray_indices, n_rays):
        src = weights[:, None] if values is None else weights[:, None] * values
        return torch.zeros(n_rays, src.shape[-1], dtype=src.dtype).index_add(0, ray_indices, src)

    module.OccGridEstimator = OccGridEstimator
    module.render_weight_from_alpha = render_weight_from_alpha
    module.accumulate_along_rays = accumulate_along_rays
    return module


@pytest.mark.parametrize("training", [False, True])
def test_nerfacc_glue_matches_torch_path_with_a_stand_in(training):
    """CPU check of the nerfacc code path's packing, lattice shift and outputs, with a fake module."""
    renderer = _renderer()
    renderer.update_step(0)  # occupancy grid from the ball
    renderer._nerfacc = _fake_nerfacc(renderer)
    cameras = orbit_cameras(2, elevation_deg=10.0, distance=3.0, fovy_deg=40.0, height=12, width=12)
    origins, directions = (x.reshape(-1, 3) for x in cameras.rays())
    light = torch.zeros_like(origins)
    offsets = torch.rand(origins.shape[0]) if training else torch.full((origins.shape[0],), 0.5)
    args = (origins, directions, light, offsets, "albedo", None, True, 7)
    with torch.no_grad():
        ref = renderer._render_rays(*args)
        got = renderer._render_rays_nerfacc(*args)
    assert list(got) == list(ref)
    assert all(got[k].shape[1:] == ref[k].shape[1:] for k in ref)
    if not training:  # same samples
        assert all(got[k].shape == ref[k].shape for k in ref)
        assert torch.equal(got["ray_index"], ref["ray_index"])
        assert torch.allclose(
            got["weights"], ref["weights"], atol=2e-3
        )  # float rounding of t at a sharp edge
    tolerance = 2e-3 if not training else 2e-2  # training: nerfacc drops a sample in the first half step
    for key in ("comp_rgb_fg", "opacity", "depth", "comp_normal"):
        assert torch.allclose(got[key], ref[key], atol=tolerance), key
    assert ref["opacity"].max() > 0.99 and ref["opacity"].min() < 0.01


@pytest.mark.gpu
def test_nerfacc_render_matches_torch_render_on_cuda():
    pytest.importorskip("nerfacc")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cameras = orbit_cameras(2, elevation_deg=10.0, distance=3.0, fovy_deg=40.0, height=32, width=32).to(
        "cuda"
    )
    outputs = {}
    for backend in ("torch", "nerfacc"):
        renderer = _renderer(backend=backend).cuda().eval()
        renderer.update_step(0)  # identical occupancy state: a function of (field, step)
        with torch.no_grad():
            outputs[backend] = renderer(cameras)
    torch_out, nerfacc_out = outputs["torch"], outputs["nerfacc"]
    assert list(nerfacc_out) == list(torch_out)
    for key, value in torch_out.items():
        if isinstance(value, torch.Tensor):
            assert nerfacc_out[key].shape[1:] == value.shape[1:], key
    assert (
        abs(nerfacc_out["weights"].numel() - torch_out["weights"].numel())
        <= 0.01 * torch_out["weights"].numel()
    )
    for key in ("opacity", "comp_rgb", "comp_rgb_fg"):
        assert torch.allclose(nerfacc_out[key], torch_out[key], atol=1e-3), key
    # gradients flow through nerfacc's compositing
    renderer = _renderer(backend="nerfacc").cuda()
    renderer.update_step(0)
    renderer(cameras, generator=torch.Generator(device="cuda").manual_seed(0))["comp_rgb"].sum().backward()
    assert renderer.geometry.logits.grad is not None and renderer.geometry.logits.grad.abs().sum() > 0
