"""The procedural ground truth is ray cast correctly in the shared camera conventions."""

from __future__ import annotations

import math

import torch

from recipes.data.cameras import look_at, spherical_to_cartesian
from recipes.data.procedural import (
    ProceduralObject,
    StripedBox,
    StripedSphere,
    default_procedural_object,
    held_out_cameras,
    reference_cameras,
    spherical_cameras,
)
from recipes.guidance.closed_form import ClosedFormPrior, angles_between_deg, view_directions

GREY = (0.5, 0.5, 0.5)


def plain_sphere(center, radius) -> StripedSphere:
    return StripedSphere(center, radius, GREY, GREY)


def pixel_angles_from_axis(size: int, fovy_deg: float) -> torch.Tensor:
    """Angle between each pixel centre's ray and the optical axis, from the pinhole model."""
    focal = 0.5 * size / math.tan(math.radians(fovy_deg) / 2)
    centres = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    radius = (centres[:, None].square() + centres[None, :].square()).sqrt()
    return torch.atan(radius / focal)


def test_centred_sphere_silhouette_is_the_cone_of_its_angular_radius():
    size, fovy, distance, radius = 48, 40.0, 3.0, 0.6
    obj = ProceduralObject(spheres=(plain_sphere((0.0, 0.0, 0.0), radius),))
    alpha = obj.render(spherical_cameras([25.0], [70.0], distance, fovy, size, size), supersample=1).alpha[
        0, 0
    ]
    angles = pixel_angles_from_axis(size, fovy)
    cone = math.asin(radius / distance)
    clear = (angles - cone).abs() > 1e-3
    assert clear.sum() > 0.95 * size * size
    assert torch.equal(alpha.bool()[clear], (angles < cone)[clear])


def test_off_centre_sphere_appears_where_the_pinhole_projects_it():
    """Camera on +x looking at the origin: world +y is image right, world +z is image up."""
    size, fovy, distance = 64, 40.0, 3.0
    center = (0.0, 0.45, 0.3)
    obj = ProceduralObject(spheres=(plain_sphere(center, 0.15),))
    alpha = obj.render(spherical_cameras([0.0], [0.0], distance, fovy, size, size), supersample=1).alpha[0, 0]
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    depth = distance - center[0]
    expected_column = size / 2 + focal * center[1] / depth
    expected_row = size / 2 - focal * center[2] / depth
    rows, columns = torch.nonzero(alpha, as_tuple=True)
    assert abs(columns.double().mean().item() + 0.5 - expected_column) < 0.5
    assert abs(rows.double().mean().item() + 0.5 - expected_row) < 0.5
    assert expected_column > size / 2 and expected_row < size / 2


def test_turned_box_seen_head_on_covers_its_front_face():
    """A box turned by 90° about z shows its y extent across the image and its x extent in depth."""
    size, fovy, distance = 48, 40.0, 3.0
    half = (0.2, 0.5, 0.3)
    obj = ProceduralObject(boxes=(StripedBox((0.0, 0.0, 0.0), half, GREY, GREY, yaw_deg=90.0),))
    alpha = obj.render(spherical_cameras([0.0], [0.0], distance, fovy, size, size), supersample=1).alpha[0, 0]
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    depth = distance - half[1]  # after the turn the local y half-extent (0.5) faces the camera along world x
    centres = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    within_x = centres.abs() < focal * half[0] / depth  # local x now runs along world y (image columns)
    within_y = centres.abs() < focal * half[2] / depth
    expected = within_y[:, None] & within_x[None, :]
    clear_x = (centres.abs() - focal * half[0] / depth).abs() > 0.05
    clear_y = (centres.abs() - focal * half[2] / depth).abs() > 0.05
    clear = clear_y[:, None] & clear_x[None, :]
    assert torch.equal(alpha.bool()[clear], expected[clear])


def test_lambert_shading_of_the_point_facing_the_camera():
    light = (1.0, 0.0, 1.0)
    obj = ProceduralObject(spheres=(plain_sphere((0.0, 0.0, 0.0), 0.5),), light_direction=light, ambient=0.2)
    rgb = obj.render(spherical_cameras([0.0], [0.0], 3.0, 40.0, 32, 32), supersample=1).rgb[0]
    # The four centre pixels surround the point (0.5, 0, 0): normal +x, n·l = cos 45°. Their normals tilt
    # symmetrically, so their mean is the centre's shade to first order; the upper ones face the light more.
    expected = 0.5 * (0.2 + 0.8 * math.cos(math.radians(45)))
    centre = rgb[:, 15:17, 15:17]
    torch.testing.assert_close(centre.mean(dim=(1, 2)), torch.full((3,), expected), atol=3e-3, rtol=0)
    assert bool((centre[:, 0] > centre[:, 1] + 0.01).all())
    # The side facing away from the light gets the ambient term only.
    dark = obj.render(spherical_cameras([0.0], [180.0], 3.0, 40.0, 16, 16), supersample=1).rgb[0]
    torch.testing.assert_close(dark[:, 7:9, 7:9], torch.full((3, 2, 2), 0.5 * 0.2), atol=1e-6, rtol=0)


def test_turned_box_face_is_lit_by_its_world_normal():
    """From azimuth 30°, a box turned by 30° shows its local +x face: world normal (cos 30°, sin 30°, 0)."""
    yaw = math.radians(30.0)
    light = (math.cos(yaw), math.sin(yaw), 1.0)  # 45° from that normal
    box = StripedBox((0.0, 0.0, 0.0), (0.3, 0.4, 0.4), GREY, GREY, yaw_deg=30.0)
    obj = ProceduralObject(boxes=(box,), light_direction=light, ambient=0.2)
    rgb = obj.render(spherical_cameras([0.0], [30.0], 3.0, 40.0, 16, 16), supersample=1).rgb[0]
    expected = 0.5 * (0.2 + 0.8 * math.cos(math.radians(45)))
    torch.testing.assert_close(rgb[:, 6:10, 6:10], torch.full((3, 4, 4), expected), atol=1e-5, rtol=0)


def test_background_is_white_and_renders_are_in_range():
    render = default_procedural_object().render(reference_cameras(height=24, width=24))
    assert render.rgb.shape == (36, 3, 24, 24) and render.alpha.shape == (36, 1, 24, 24)
    assert render.rgb.min() >= 0 and render.rgb.max() <= 1
    assert bool((render.rgb[:, :, 0, 0] == 1).all()) and bool((render.alpha[:, :, 0, 0] == 0).all())
    coverage = render.alpha.mean(dim=(1, 2, 3))
    assert bool((coverage > 0.05).all()) and bool((coverage < 0.6).all())


def test_renders_are_deterministic_and_differ_across_views():
    obj, cameras = default_procedural_object(), reference_cameras(height=24, width=24)
    first, second = obj.render(cameras).rgb, obj.render(cameras).rgb
    assert torch.equal(first, second)
    flat = first.flatten(1)
    pairwise = (flat[:, None] - flat[None]).abs().mean(dim=-1)
    off_diagonal = pairwise[~torch.eye(len(cameras), dtype=torch.bool)]
    assert off_diagonal.min() > 0.01


def test_reference_grid_and_held_out_views():
    references = reference_cameras()
    assert len(references) == 36
    assert references.elevation_deg.tolist() == [-10.0] * 12 + [20.0] * 12 + [50.0] * 12
    assert references.azimuth_deg[:12].tolist() == [30.0 * k for k in range(12)]
    positions = spherical_to_cartesian(references.elevation_deg, references.azimuth_deg, references.distance)
    torch.testing.assert_close(references.c2w, look_at(positions, torch.zeros_like(positions)))
    held_out = held_out_cameras()
    assert held_out.azimuth_deg.tolist() == [15.0 + 45.0 * k for k in range(8)]
    assert held_out.elevation_deg.tolist() == [5.0, 35.0] * 4
    nearest = angles_between_deg(view_directions(held_out), view_directions(references)).min(dim=1).values
    assert nearest.min() > 10.0


def test_prior_of_the_procedural_object_denoises_its_own_views():
    prior = ClosedFormPrior.from_procedural_object(height=16)
    cameras = reference_cameras(height=16, width=16)
    views = default_procedural_object().render(cameras).rgb * 2 - 1
    torch.testing.assert_close(prior.references, views)
    assert prior.num_references == 36 and views.min() >= -1 and views.max() <= 1
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x_t = prior.alphas_cumprod[950].sqrt() * views[[5, 20]] + 0.3 * noise
    weights = prior.mixture_weights(x_t, torch.tensor([950, 950]), cameras[torch.tensor([5, 20])])
    assert weights.argmax(dim=1).tolist() == [5, 20]
