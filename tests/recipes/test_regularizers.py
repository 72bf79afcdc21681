"""Regularizers on renderer outputs and their step-scheduled weights."""

import math

import pytest
import torch
from torch import nn

from recipes.data.cameras import orbit_cameras
from recipes.geometry.mesh import TriangleMesh
from recipes.geometry.nerf import FieldOutput, ImplicitVolumeConfig
from recipes.losses import (
    RegularizerWeights,
    eikonal_loss,
    opaque_loss,
    orientation_loss,
    regularization,
    sparsity_loss,
    z_variance_loss,
)
from recipes.render.background import SolidColorBackground, SolidColorConfig
from recipes.render.materials import NoMaterial
from recipes.render.occupancy import OccupancyGridConfig
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig


class Ball(nn.Module):
    """A solid ball of radius 0.5 whose normals point outwards (or inwards, ``flip=True``)."""

    def __init__(self, flip: bool = False, sigma: float = 200.0) -> None:
        super().__init__()
        self.sign, self.sigma = (-1.0 if flip else 1.0), sigma
        self.logits = nn.Parameter(torch.zeros(3))
        self.radius = 1.0
        self.config = ImplicitVolumeConfig(radius=1.0, normal_type="analytic")

    def density(self, points):
        return self.sigma * torch.sigmoid(400.0 * (0.5 - points.norm(dim=-1)))

    def forward(self, points, with_normal=False):
        normal = self.sign * nn.functional.normalize(points, dim=-1) if with_normal else None
        return FieldOutput(
            self.logits.expand(points.shape[0], 3), density=self.density(points), normal=normal
        )


def render_ball(flip: bool = False, output_normal: bool = True, sigma: float = 200.0) -> dict:
    config = VolumeRendererConfig(
        num_samples_per_ray=64, occupancy=OccupancyGridConfig(enabled=False), output_normal=output_normal
    )
    renderer = VolumeRenderer(
        Ball(flip, sigma), NoMaterial(), SolidColorBackground(SolidColorConfig()), config
    )
    return renderer.eval()(orbit_cameras(1, distance=2.0, fovy_deg=40.0, height=12, width=12))


def test_renderer_outputs_feed_every_volume_regularizer_and_orientation_sees_flipped_normals():
    assert "normal" not in render_ball(output_normal=False)  # NoMaterial needs none: opt in
    outward, inward = render_ball(), render_ball(flip=True)
    weights = RegularizerWeights(orient=1.0, sparsity=1.0, opaque=1.0, z_variance=1.0)
    terms = regularization(outward, weights, step=0)
    assert set(terms) == {"loss_orient", "loss_sparsity", "loss_opaque", "loss_z_variance"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    # outward normals face the camera where the weights are: nothing to penalise; inward ones face away
    assert orientation_loss(outward) < 1e-3
    assert orientation_loss(inward) > 0.3
    # a solid ball's depth is sharper than a translucent one's
    assert 0 < z_variance_loss(outward) < 0.25 * z_variance_loss(render_ball(sigma=3.0))


def test_each_loss_matches_its_formula_on_hand_made_outputs():
    opacity = torch.tensor([[0.0], [0.25], [0.9], [1.0]])
    assert sparsity_loss({"opacity": opacity}) == pytest.approx(
        sum(math.sqrt(o**2 + 0.01) for o in (0.0, 0.25, 0.9, 1.0)) / 4
    )

    def entropy(o):
        o = min(max(o, 1e-3), 1 - 1e-3)
        return -(o * math.log(o) + (1 - o) * math.log(1 - o))

    assert opaque_loss({"opacity": opacity}) == pytest.approx(
        sum(entropy(o) for o in (0.0, 0.25, 0.9, 1.0)) / 4, rel=1e-5
    )
    # 3 samples: n·d = 1 (away), −1 (towards: no penalty), 0.5; two pixels have opacity > 0
    normal = torch.tensor([[0.0, 0, 1], [0, 0, -1], [0, 0.5, math.sqrt(0.75)]])
    t_dirs = torch.tensor([[0.0, 0, 1], [0, 0, 1], [0, 1, 0]])
    outputs = {"weights": torch.tensor([0.5, 0.7, 0.2]), "normal": normal, "t_dirs": t_dirs}
    outputs["opacity"] = torch.tensor([[0.0], [0.3], [0.6]])
    assert orientation_loss(outputs) == pytest.approx((0.5 * 1.0 + 0.2 * 0.25) / 2)
    z = torch.tensor([[1.0], [2.0], [4.0]])
    assert z_variance_loss({"z_variance": z, "opacity": torch.tensor([[0.4], [0.6], [0.9]])}) == 3.0
    gradient = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert eikonal_loss({"sdf_gradient": gradient}) == pytest.approx(8.0)


def test_orientation_gradient_reaches_normals_not_weights_and_empty_z_variance_is_zero():
    normal = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    weights = torch.tensor([0.5], requires_grad=True)
    out = {"weights": weights, "normal": normal, "t_dirs": torch.tensor([[0.0, 0, 1]])}
    out["opacity"] = torch.ones(1, 1)
    orientation_loss(out).backward()
    assert weights.grad is None and normal.grad[0, 2] == pytest.approx(1.0)
    z = torch.ones(2, 1, requires_grad=True)
    loss = z_variance_loss({"z_variance": z, "opacity": torch.zeros(2, 1)})
    loss.backward()
    assert loss == 0 and z.grad is not None


def test_weights_follow_threestudio_schedules_and_zero_weights_are_not_computed():
    opacity = torch.full((1, 2, 2, 1), 0.5)
    weights = RegularizerWeights(orient=[0, 10, 1000, 5000], sparsity=1, opaque=[10000, 0, 1000, 10001])
    assert weights.at(0)["orient"] == 10 and weights.at(2500)["orient"] == 505
    assert weights.at(9000)["orient"] == 1000 and weights.at(10001)["opaque"] == 1000
    # at step 5000 opaque is 0 and orient needs normals the outputs lack: only sparsity is computed
    with pytest.raises(KeyError, match="orientation loss needs 'weights', 'normal', 't_dirs'"):
        regularization({"opacity": opacity}, weights, step=5000)
    no_orient = RegularizerWeights(sparsity=2, opaque=[10000, 0, 1000, 10001])
    terms = regularization({"opacity": opacity}, no_orient, step=5000)
    assert set(terms) == {"loss_sparsity"}
    assert terms["loss_sparsity"] == pytest.approx(2 * math.sqrt(0.26))
    later = regularization({"opacity": opacity}, no_orient, step=10001)
    assert later["loss_opaque"] == pytest.approx(1000 * math.log(2), rel=1e-5)
    assert regularization({}, RegularizerWeights(), step=0) == {}


def test_mesh_regularizers_and_bad_schedules():
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    terms = regularization(
        {"mesh": TriangleMesh(vertices, faces)},
        RegularizerWeights(normal_consistency=2.0, laplacian_smoothness=3.0),
        step=0,
    )
    assert terms["loss_normal_consistency"] > 0 and terms["loss_laplacian_smoothness"] > 0
    with pytest.raises(ValueError, match="regularizer weight 'orient'"):
        RegularizerWeights(orient=[0, 10])
    with pytest.raises(ValueError, match="regularizer weight 'sparsity'"):
        RegularizerWeights(sparsity=[10, 1, 2, 5])
