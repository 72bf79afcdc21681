"""SDF field (sphere init, normals, eikonal loss) and the NeuS renderer."""

import torch
from torch import nn

from recipes.data.cameras import orbit_cameras
from recipes.geometry.hashgrid import HashGridConfig
from recipes.geometry.nerf import FieldOutput
from recipes.geometry.sdf import ImplicitSDF, ImplicitSDFConfig, eikonal_loss
from recipes.render.background import NeuralEnvironmentMapBackground, SolidColorBackground, SolidColorConfig
from recipes.render.materials import DiffusePointLightConfig, DiffusePointLightMaterial, NoMaterial
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.render.occupancy import OccupancyGridConfig

SMALL_GRID = HashGridConfig(
    n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, start_level=2, update_steps=10
)


class AnalyticSDFSphere(nn.Module):
    """Exact SDF of a ball with a constant colour (its logits are the only parameter)."""

    def __init__(self, ball: float = 0.5) -> None:
        super().__init__()
        self.ball, self.radius = ball, 1.0
        self.logits = nn.Parameter(torch.logit(torch.tensor([0.2, 0.7, 0.4])))

    def sdf(self, points):
        return points.norm(dim=-1) - self.ball

    def forward(self, points, with_normal=True):
        normal = nn.functional.normalize(points, dim=-1)
        return FieldOutput(
            features=self.logits.expand(points.shape[0], 3),
            sdf=self.sdf(points),
            sdf_gradient=normal,
            normal=normal,
        )


def _neus(geometry, material, background=None, samples=96, variance=0.6, occupancy=False):
    background = (
        background if background is not None else SolidColorBackground(SolidColorConfig((1.0, 1.0, 1.0)))
    )
    config = NeuSRendererConfig(
        num_samples_per_ray=samples, variance_init=variance, occupancy=OccupancyGridConfig(enabled=occupancy)
    )
    return NeuSRenderer(geometry, material, background, config)


def _silhouette(cameras, ball):
    origins, directions = cameras.rays()
    along = -(origins * directions).sum(-1, keepdim=True)
    return (origins + along * directions).norm(dim=-1) < ball


def test_sdf_field_starts_as_a_sphere_with_unit_gradient():
    field = ImplicitSDF(
        ImplicitSDFConfig(encoding=SMALL_GRID, sphere_radius=0.4, finite_difference_normal_eps=0.01)
    )
    points = torch.rand(256, 3, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    out = field(points)
    assert torch.allclose(out.sdf, points.norm(dim=-1) - 0.4, atol=1e-3)
    assert torch.allclose(out.normal, nn.functional.normalize(points, dim=-1), atol=1e-2)
    assert eikonal_loss(out.sdf_gradient) < 1e-3
    assert torch.allclose(eikonal_loss(2 * out.sdf_gradient), torch.tensor(1.0), atol=1e-2)
    analytic = ImplicitSDF(ImplicitSDFConfig(encoding=SMALL_GRID, normal_type="analytic", sphere_radius=0.4))
    analytic.load_state_dict(field.state_dict())
    assert torch.allclose(analytic(points).sdf_gradient, out.sdf_gradient, atol=1e-2)


def test_progressive_finite_difference_step_follows_the_band_mask():
    field = ImplicitSDF(ImplicitSDFConfig(encoding=SMALL_GRID))
    field.update_step(0)
    coarse = field.finite_difference_eps()
    field.update_step(25)
    assert coarse == 0.5 * 2.0 / 8 and field.finite_difference_eps() == 0.5 * 2.0 / 32


def test_neus_render_of_analytic_sphere_matches_silhouette_and_colour():
    cameras = orbit_cameras(2, elevation_deg=30.0, distance=3.0, fovy_deg=40.0, height=24, width=24)
    renderer = _neus(AnalyticSDFSphere(), NoMaterial()).eval()
    with torch.no_grad():
        out = renderer(cameras)
    expected = _silhouette(cameras, 0.5)
    opacity = out["opacity"][..., 0]
    assert ((opacity > 0.5) == expected).float().mean() > 0.97
    core = expected & (opacity > 0.98)
    assert core.float().sum() > 0.8 * expected.float().sum()
    assert torch.allclose(
        out["comp_rgb"][core], torch.tensor([0.2, 0.7, 0.4]).expand(int(core.sum()), 3), atol=0.03
    )
    assert torch.allclose(out["comp_rgb"][~expected].mean(0), torch.ones(3), atol=0.02)


def test_neus_render_of_sphere_initialised_field_and_occupancy_grid():
    cameras = orbit_cameras(1, elevation_deg=10.0, distance=3.0, fovy_deg=40.0, height=16, width=16)
    renderer = _neus(
        ImplicitSDF(ImplicitSDFConfig(encoding=SMALL_GRID)), NoMaterial(), samples=64, occupancy=True
    )
    renderer.eval()
    with torch.no_grad():
        dense = renderer(cameras)
        renderer.update_step(0)
        skipping = renderer(cameras)
    assert ((dense["opacity"][..., 0] > 0.5) == _silhouette(cameras, 0.5)).float().mean() > 0.95
    assert renderer.occupancy_grid.occupied_fraction() < 0.4
    assert skipping["weights"].numel() < 0.6 * dense["weights"].numel()
    assert torch.allclose(skipping["opacity"], dense["opacity"], atol=1e-3)


def test_gradients_reach_every_parameter_of_sdf_neus_material_and_background():
    torch.manual_seed(0)
    field = ImplicitSDF(ImplicitSDFConfig(encoding=SMALL_GRID, finite_difference_normal_eps=0.05))
    field.update_step(100)
    material = DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0))
    renderer = _neus(field, material, NeuralEnvironmentMapBackground(), samples=32, variance=0.3).train()
    out = renderer(orbit_cameras(2, distance=2.0, height=12, width=12), shading="diffuse")
    loss = out["comp_rgb"].mean() + 0.1 * eikonal_loss(out["sdf_gradient"])
    loss.backward()
    for name, parameter in renderer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_cosine_annealing_follows_the_step():
    renderer = _neus(AnalyticSDFSphere(), NoMaterial())
    renderer.config.cos_anneal_end_steps = 100
    renderer.update_step(25)
    assert renderer.cos_anneal_ratio == 0.25
    renderer.update_step(400)
    assert renderer.cos_anneal_ratio == 1.0
