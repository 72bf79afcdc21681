"""NeRF field, hash grid, volume renderer, materials, background and occupancy grid."""

import logging
import math

import pytest
import torch
from torch import nn

from recipes.data.cameras import orbit_cameras
from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.nerf import FieldOutput, ImplicitVolume, ImplicitVolumeConfig
from recipes.render.background import (
    NeuralEnvironmentMapBackground,
    NeuralEnvironmentMapConfig,
    SolidColorBackground,
    SolidColorConfig,
    spherical_harmonics,
)
from recipes.render.materials import DiffusePointLightConfig, DiffusePointLightMaterial, NoMaterial
from recipes.render.occupancy import OccupancyGridConfig
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig

SMALL_GRID = HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


class AnalyticSphere(nn.Module):
    """A solid ball of radius ``ball`` and constant colour; its colour logits are the only parameter."""

    def __init__(self, ball: float = 0.5, radius: float = 1.0, sigma: float = 200.0) -> None:
        super().__init__()
        self.ball, self.radius, self.sigma = ball, radius, sigma
        self.logits = nn.Parameter(torch.logit(torch.tensor([0.8, 0.3, 0.1])))
        self.config = ImplicitVolumeConfig(radius=radius, normal_type="analytic")

    def density(self, points):
        return self.sigma * torch.sigmoid(400.0 * (self.ball - points.norm(dim=-1)))

    def forward(self, points, with_normal=False):
        normal = nn.functional.normalize(points, dim=-1) if with_normal else None
        return FieldOutput(
            features=self.logits.expand(points.shape[0], 3), density=self.density(points), normal=normal
        )


def _silhouette(cameras, ball):
    origins, directions = cameras.rays()
    along = -(origins * directions).sum(-1, keepdim=True)
    return (origins + along * directions).norm(dim=-1) < ball


def _renderer(geometry, material, background=None, samples=96, occupancy=False):
    background = (
        background if background is not None else SolidColorBackground(SolidColorConfig((0.0, 0.0, 1.0)))
    )
    config = VolumeRendererConfig(
        num_samples_per_ray=samples, occupancy=OccupancyGridConfig(enabled=occupancy)
    )
    return VolumeRenderer(geometry, material, background, config)


def test_hashgrid_interpolates_dense_and_hashed_levels_and_band_mask():
    config = HashGridConfig(
        n_levels=3,
        log2_hashmap_size=9,
        base_resolution=4,
        per_level_scale=3.0,
        start_level=1,
        start_step=10,
        update_steps=5,
    )
    grid = HashGridEncoding(config)
    assert grid.resolutions == [4, 12, 36]  # 5^3 fits the 512-entry table, 13^3 and 37^3 are hashed
    with torch.no_grad():
        grid.tables.normal_()
    grid.update_step(100)
    x = torch.rand(64, 3)
    # trilinear interpolation: exact at grid vertices, linear along a cell edge
    vertex = torch.tensor([[0.25, 0.5, 0.75]])
    inner = torch.tensor([[0.25 + 0.25 * 0.3, 0.5, 0.75]])
    next_vertex = torch.tensor([[0.5, 0.5, 0.75]])
    lerp = 0.7 * grid(vertex)[:, :2] + 0.3 * grid(next_vertex)[:, :2]
    assert torch.allclose(grid(inner)[:, :2], lerp, atol=1e-5)
    assert grid(x).shape == (64, 6)
    assert [config.enabled_levels(s) for s in (0, 10, 14, 15, 20, 1000)] == [1, 1, 1, 2, 3, 3]
    grid.update_step(0)
    features = grid(x)
    assert (features[:, 2:] == 0).all() and (features[:, :2] != 0).any()


def test_tcnn_backend_missing_raises_clear_error_and_choice_is_logged(caplog):
    try:
        import tinycudann  # noqa: F401

        pytest.skip("tinycudann is installed")
    except ImportError:
        pass
    from recipes.geometry.backend import BackendNeedsCUDAError

    if torch.cuda.is_available():
        with pytest.raises(ImportError, match="tinycudann"):
            HashGridEncoding(HashGridConfig(backend="tcnn"))
    else:
        with pytest.raises(BackendNeedsCUDAError, match="hash grid backend 'tcnn'"):
            HashGridEncoding(HashGridConfig(backend="tcnn"))
    import recipes.geometry.backend as backend

    backend._logged.discard(("hash grid", "torch"))
    with caplog.at_level(logging.INFO, logger="recipes"):
        HashGridEncoding(SMALL_GRID)
        HashGridEncoding(SMALL_GRID)
    assert [r.getMessage() for r in caplog.records].count("hash grid backend: torch") == 1


def test_nerf_density_blob_and_normals():
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=SMALL_GRID, normal_type="analytic"))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.9]])
    density = field.density(points)
    # magic3d blob: softplus(10 (1 - |x| / 0.5)) dominates the freshly initialised network
    assert density[0] > density[1] > density[2]
    assert torch.allclose(density, nn.functional.softplus(10 * (1 - points.norm(dim=-1) / 0.5)), rtol=0.05)
    analytic = field(points[1:], with_normal=True).normal
    assert torch.allclose(analytic[0], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)
    fd = ImplicitVolume(ImplicitVolumeConfig(encoding=SMALL_GRID, normal_type="finite_difference"))
    fd.load_state_dict(field.state_dict())
    assert torch.allclose(fd(points[1:], with_normal=True).normal, analytic, atol=0.05)


def test_render_analytic_sphere_matches_silhouette_and_colour():
    cameras = orbit_cameras(2, elevation_deg=20.0, distance=3.0, fovy_deg=40.0, height=24, width=24)
    renderer = _renderer(AnalyticSphere(), NoMaterial()).eval()
    with torch.no_grad():
        out = renderer(cameras)
    expected = _silhouette(cameras, 0.5)
    opacity = out["opacity"][..., 0]
    assert ((opacity > 0.5) == expected).float().mean() > 0.97
    assert (opacity[expected] > 0.9).float().mean() > 0.95
    inside = out["comp_rgb"][expected & (opacity > 0.99)]
    assert torch.allclose(inside, torch.tensor([0.8, 0.3, 0.1]).expand_as(inside), atol=0.02)
    outside = out["comp_rgb"][~expected]
    assert torch.allclose(outside.mean(0), torch.tensor([0.0, 0.0, 1.0]), atol=0.02)
    origins, directions = cameras.rays()
    along = -(origins * directions).sum(-1)
    miss_squared = origins.square().sum(-1) - along.square()
    front = along - (0.25 - miss_squared).clamp(min=0).sqrt()  # first hit of the ball along each ray
    core = (miss_squared < 0.45**2) & (opacity > 0.99)
    assert core.sum() > 50
    assert torch.allclose(out["depth"][..., 0][core], front[core], atol=renderer.render_step_size)


def test_diffuse_material_shades_by_light_and_samples_modes_from_generator():
    material = DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0))
    features = torch.zeros(2, 3)  # sigmoid -> albedo 0.5
    positions = torch.zeros(2, 3)
    normal = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    light = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    lit = material(features, positions, normal, light, "diffuse")
    assert torch.allclose(lit, torch.tensor([[0.5] * 3, [0.05] * 3]))
    assert torch.allclose(
        material(features, positions, normal, light, "textureless")[1], torch.full((3,), 0.1)
    )
    assert torch.allclose(material(features, positions, normal, light, "albedo"), torch.full((2, 3), 0.5))
    modes = [material.sample_shading(torch.Generator().manual_seed(s))[0] for s in range(400)]
    assert modes == [material.sample_shading(torch.Generator().manual_seed(s))[0] for s in range(400)]
    share = {m: modes.count(m) / 400 for m in ("albedo", "textureless", "diffuse")}
    assert 0.17 < share["albedo"] < 0.33 and 0.3 < share["textureless"] < 0.45
    material.update_step(0)
    ambient = DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=10))
    ambient.update_step(9)
    assert ambient.sample_shading(torch.Generator().manual_seed(0))[0] == "albedo"
    ambient.update_step(10)
    assert ambient.default_shading() == "diffuse"


def test_spherical_harmonics_are_orthonormal_and_background_random_aug():
    directions = nn.functional.normalize(
        torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    basis = spherical_harmonics(directions, 4)
    gram = basis.T @ basis * (4 * math.pi / directions.shape[0])
    assert torch.allclose(gram, torch.eye(16), atol=0.03)
    background = NeuralEnvironmentMapBackground(
        NeuralEnvironmentMapConfig(random_aug=True, random_aug_prob=1.0)
    )
    views = nn.functional.normalize(torch.randn(3, 4, 4, 3), dim=-1)
    solid = background(views, generator=torch.Generator().manual_seed(1))
    assert torch.equal(solid, solid[:, :1, :1].expand_as(solid))  # one solid colour per view
    assert torch.equal(solid, background(views, generator=torch.Generator().manual_seed(1)))


def test_gradients_reach_every_parameter_of_nerf_material_and_background():
    torch.manual_seed(0)
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=SMALL_GRID, normal_type="analytic"))
    renderer = _renderer(
        field,
        DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0)),
        NeuralEnvironmentMapBackground(),
        samples=32,
    ).train()
    cameras = orbit_cameras(2, distance=2.0, height=12, width=12)
    out = renderer(cameras, shading="diffuse")
    orientation = (
        out["weights"].detach() * (out["normal"] * out["t_dirs"]).sum(-1).clamp(min=0).square()
    ).sum()
    (out["comp_rgb"].mean() + orientation).backward()
    for name, parameter in renderer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_render_is_reproducible_from_generator():
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=SMALL_GRID))
    renderer = _renderer(
        field,
        DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0)),
        NeuralEnvironmentMapBackground(NeuralEnvironmentMapConfig(random_aug=True)),
        samples=32,
    )
    cameras = orbit_cameras(2, distance=2.0, height=8, width=8)
    first = renderer(cameras, generator=torch.Generator().manual_seed(3))
    again = renderer(cameras, generator=torch.Generator().manual_seed(3))
    assert first["shading"] == again["shading"] and torch.equal(first["comp_rgb"], again["comp_rgb"])
    torch.manual_seed(5)
    a = renderer(cameras)["comp_rgb"]
    torch.manual_seed(5)
    assert torch.equal(a, renderer(cameras)["comp_rgb"])


def test_occupancy_grid_is_deterministic_skips_empty_space_and_keeps_the_render():
    cameras = orbit_cameras(1, elevation_deg=10.0, distance=3.0, fovy_deg=40.0, height=16, width=16)
    renderer = _renderer(AnalyticSphere(), NoMaterial(), samples=64, occupancy=True).eval()
    with torch.no_grad():
        dense = renderer(cameras)
        assert not renderer.occupancy_grid.update(3, renderer.occupancy_fn)  # not an update step
        assert renderer.occupancy_grid.update(16, renderer.occupancy_fn)
        skipping = renderer(cameras)
    grid = renderer.occupancy_grid
    assert (
        0.05 < grid.occupied_fraction() < 0.2
    )  # the ball (radius ~0.52 at this threshold) fills ~7 % of the box
    assert grid.occupied(torch.zeros(1, 3)).item() and not grid.occupied(torch.full((1, 3), 0.9)).item()
    assert skipping["weights"].numel() < 0.5 * dense["weights"].numel()
    assert torch.allclose(skipping["comp_rgb"], dense["comp_rgb"], atol=1e-4)
    twin = _renderer(AnalyticSphere(), NoMaterial(), samples=64, occupancy=True)
    twin.occupancy_grid.update(16, twin.occupancy_fn)
    assert torch.equal(twin.occupancy_grid.occupancy, grid.occupancy)
    other_step = _renderer(AnalyticSphere(), NoMaterial(), samples=64, occupancy=True)
    other_step.occupancy_grid.update(32, other_step.occupancy_fn)
    assert not torch.equal(other_step.occupancy_grid.occupancy, grid.occupancy)  # jitter depends on the step


@pytest.mark.gpu
def test_torch_path_on_cuda_matches_cpu_render():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=SMALL_GRID, normal_type="analytic"))
    material = DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0))
    renderer = _renderer(field, material, NeuralEnvironmentMapBackground(), samples=64, occupancy=True).eval()
    cameras = orbit_cameras(2, distance=2.0, height=32, width=32)
    renderer.update_step(0)
    cpu = renderer(cameras)["comp_rgb"].detach()
    renderer.cuda()
    renderer.update_step(0)
    gpu = renderer(cameras.to("cuda"))["comp_rgb"].detach().cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


@pytest.mark.gpu
def test_tcnn_hash_grid_fits_like_the_torch_reference():
    """tcnn is not bit-compatible with the torch grid; both must fit the same field equally well."""
    pytest.importorskip("tinycudann")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator(device="cuda").manual_seed(0)
    points = torch.rand(65536, 3, device="cuda", generator=generator)
    target = torch.sin(6 * points).prod(-1, keepdim=True)
    errors = {}
    for backend in ("torch", "tcnn"):
        torch.manual_seed(0)
        encoding = HashGridEncoding(HashGridConfig(log2_hashmap_size=16, backend=backend)).cuda()
        decoder = nn.Sequential(nn.Linear(encoding.n_output_dims, 64), nn.ReLU(), nn.Linear(64, 1)).cuda()
        optimizer = torch.optim.Adam([*encoding.parameters(), *decoder.parameters()], lr=1e-2, eps=1e-15)
        for _ in range(300):
            loss = (decoder(encoding(points)) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors[backend] = loss.item()
    assert errors["torch"] < 1e-3 and errors["tcnn"] < 1e-3
    assert errors["tcnn"] < 3 * errors["torch"] + 1e-4


def test_the_nerf_scene_gives_its_mlps_their_own_learning_rate():
    from recipes.geometry.mlp import MLPConfig
    from recipes.system.nerf_scene import NeRFOptimizer, NeRFScene

    field = ImplicitVolumeConfig(
        encoding=HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4),
        mlp=MLPConfig(n_neurons=8),
    )
    plain, _ = NeRFScene(field=field).configure_optimizers()
    assert [(g["name"], g["lr"]) for g in plain.param_groups] == [("geometry", 0.01), ("background", 0.001)]
    scene = NeRFScene(field=field, optimizer=NeRFOptimizer(network_lr=0.001, name="adamw"))
    optimizer, _ = scene.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["geometry"] == 0.01 and lrs["networks"] == 0.001
    grid = {id(p) for p in scene.renderer.geometry.encoding.parameters()}
    geometry_group = next(g for g in optimizer.param_groups if g["name"] == "geometry")
    assert {id(p) for p in geometry_group["params"]} == grid
    everything = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert everything == {id(p) for p in scene.parameters() if p.requires_grad}
