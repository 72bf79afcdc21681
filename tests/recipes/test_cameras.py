"""Camera conventions (z-up world, OpenGL c2w), turntables and the step-indexed random camera batches."""

import math

import pytest
import torch

from recipes.data.cameras import Cameras, cameras_from_spherical, look_at, orbit_cameras


def _project_pixels(cameras: Cameras, points: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (x = column, y = row, top-left origin) of world points [B, N, 3] through mvp."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    clip = torch.einsum("bij,bnj->bni", cameras.mvp(), homogeneous)
    ndc = clip[..., :3] / clip[..., 3:]
    column = (ndc[..., 0] + 1) * 0.5 * cameras.width
    row = (1 - ndc[..., 1]) * 0.5 * cameras.height
    return torch.stack([column, row], dim=-1)


def test_look_at_is_opengl_and_z_up():
    eye = torch.tensor([[2.0, 0.0, 0.0]])
    c2w = look_at(eye, torch.zeros(1, 3))
    assert torch.allclose(c2w[0, :3, 2], torch.tensor([1.0, 0.0, 0.0]))  # camera looks along its -z
    assert torch.allclose(c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0]))  # camera y is world up
    assert torch.allclose(c2w[0, :3, 0], torch.tensor([0.0, 1.0, 0.0]))  # right-handed: x = y × z
    assert torch.allclose(c2w[0, :3, 3], eye[0])
    rotation = c2w[0, :3, :3]
    assert torch.allclose(rotation.T @ rotation, torch.eye(3), atol=1e-6)
    assert torch.det(rotation) == pytest.approx(1.0, abs=1e-6)


def test_orbit_cameras_look_at_origin_from_given_distance():
    cams = orbit_cameras(8, elevation_deg=30.0, distance=2.5, fovy_deg=40.0, height=9, width=9)
    assert len(cams) == 8
    assert torch.allclose(cams.positions.norm(dim=-1), torch.full((8,), 2.5))
    assert torch.allclose(cams.azimuth_deg, torch.arange(8) * 45.0)
    # elevation: z = d sin(e); azimuth 0 is on +x
    assert torch.allclose(cams.positions[:, 2], torch.full((8,), 2.5 * math.sin(math.radians(30.0))))
    assert cams.positions[0, 0] > 0 and cams.positions[0, 1].abs() < 1e-6
    assert cams.positions[2, 1] > 0 and cams.positions[2, 0].abs() < 1e-5  # azimuth 90 deg is +y
    # the central pixel's ray passes through the origin
    origins, directions = cams.rays()
    centre = directions[:, 4, 4]
    closest = origins[:, 4, 4] + (-(origins[:, 4, 4] * centre).sum(-1, keepdim=True)) * centre
    assert closest.norm(dim=-1).max() < 1e-5
    assert torch.allclose(directions.norm(dim=-1), torch.ones(8, 9, 9), atol=1e-6)


def test_rays_mvp_and_opencv_intrinsics_agree_on_pixels():
    cams = orbit_cameras(3, elevation_deg=20.0, distance=3.0, fovy_deg=50.0, height=12, width=16)
    origins, directions = cams.rays()
    points = (origins + 1.7 * directions).reshape(3, -1, 3)
    rows, cols = torch.meshgrid(torch.arange(12) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    expected = torch.stack([cols, rows], dim=-1).reshape(1, -1, 2).expand(3, -1, -1)
    assert torch.allclose(_project_pixels(cams, points), expected, atol=1e-3)
    camera_points = torch.einsum("bij,bnj->bni", cams.viewmats_opencv()[:, :3, :3], points)
    camera_points = camera_points + cams.viewmats_opencv()[:, None, :3, 3]
    assert (camera_points[..., 2] > 0).all()
    pixels = torch.einsum("bij,bnj->bni", cams.intrinsics(), camera_points)
    assert torch.allclose(pixels[..., :2] / pixels[..., 2:], expected, atol=1e-3)


def test_world_up_projects_to_top_rows():
    cams = orbit_cameras(1, elevation_deg=0.0, distance=2.0, fovy_deg=60.0, height=32, width=32)
    pixel = _project_pixels(cams, torch.tensor([[[0.0, 0.0, 0.5]]]))
    assert pixel[0, 0, 1] < 16  # above the centre of the image
    assert pixel[0, 0, 0] == pytest.approx(16.0, abs=1e-4)


def test_cameras_index_and_move():
    cams = orbit_cameras(4, height=8, width=8)
    assert len(cams[1]) == 1 and torch.equal(cams[1].c2w[0], cams.c2w[1])
    assert len(cams[1:3]) == 2
    assert cams.to("cpu").c2w.device.type == "cpu"


def _assert_same_cameras(a: Cameras, b: Cameras) -> None:
    for name in ("c2w", "fovy", "elevation_deg", "azimuth_deg", "distance", "light_positions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.height, a.width) == (b.height, b.width)


def test_random_cameras_are_a_pure_function_of_seed_and_step():
    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset

    dataset = RandomCameraDataset(RandomCameraConfig(batch_size=4), seed=7, num_steps=100)
    global_state = torch.get_rng_state()
    first = dataset[5]
    _ = dataset[3], dataset[99]
    again = RandomCameraDataset(RandomCameraConfig(batch_size=4), seed=7, num_steps=100)[5]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never consumed
    _assert_same_cameras(first, dataset[5])
    _assert_same_cameras(first, again)
    assert not torch.equal(first.c2w, dataset[6].c2w)
    other_seed = RandomCameraDataset(RandomCameraConfig(batch_size=4), seed=8, num_steps=100)[5]
    assert not torch.equal(first.c2w, other_seed.c2w)
    with pytest.raises(IndexError):
        dataset[100]


def test_random_cameras_respect_ranges_strata_and_lights():
    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset

    config = RandomCameraConfig(batch_size=8, camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0)
    dataset = RandomCameraDataset(config, seed=0, num_steps=50)
    for step in range(0, 50, 7):
        cams = dataset[step]
        assert len(cams) == 8 and cams.height == cams.width == 64
        assert ((cams.elevation_deg >= -10) & (cams.elevation_deg <= 90)).all()
        strata = torch.floor((cams.azimuth_deg + 180) / 45)
        assert torch.equal(strata, torch.arange(8.0))  # one azimuth per 45-degree stratum
        assert torch.allclose(cams.positions.norm(dim=-1), cams.distance, atol=1e-5)
        assert ((cams.distance >= 1.0) & (cams.distance <= 1.5)).all()
        degrees = torch.rad2deg(cams.fovy)
        assert ((degrees >= 40) & (degrees <= 70)).all()
        light_distance = cams.light_positions.norm(dim=-1)
        assert ((light_distance >= 0.8 - 1e-5) & (light_distance <= 1.5 + 1e-5)).all()
        forward = -cams.c2w[:, :3, 2]  # without perturbation every camera looks at the origin
        assert torch.allclose(forward, -torch.nn.functional.normalize(cams.positions, dim=-1), atol=1e-5)
    magic3d = RandomCameraDataset(
        RandomCameraConfig(batch_size=8, light_sample_strategy="magic3d"), seed=0, num_steps=5
    )[2]
    cosine = torch.nn.functional.cosine_similarity(magic3d.light_positions, magic3d.positions, dim=-1)
    assert (cosine >= math.cos(math.radians(60)) - 1e-4).all()  # light elevation 30..90 deg over the view


def test_random_cameras_can_be_drawn_from_a_grid_of_poses():
    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset

    grid = dict(elevation_choices=[-10.0, 20.0, 50.0], azimuth_choices=[0.0, 30.0, 60.0])
    fixed = dict(camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0, camera_distance_range=(3.0, 3.0))
    dataset = RandomCameraDataset(RandomCameraConfig(batch_size=4, **grid, **fixed), seed=1, num_steps=40)
    seen = set()
    for step in range(40):
        cams = dataset[step]
        seen |= {(e, a) for e, a in zip(cams.elevation_deg.tolist(), cams.azimuth_deg.tolist())}
        expected = cameras_from_spherical(
            cams.elevation_deg, cams.azimuth_deg, torch.full((4,), 3.0), torch.rad2deg(cams.fovy), 64, 64
        )
        torch.testing.assert_close(cams.positions, expected.positions)  # the pose is the drawn grid pose
    assert seen == {(e, a) for e in grid["elevation_choices"] for a in grid["azimuth_choices"]}
    # Unset, the elevations come from the continuous range.
    plain = RandomCameraDataset(RandomCameraConfig(batch_size=4), seed=1, num_steps=2)[1]
    assert not set(plain.elevation_deg.tolist()) <= set(grid["elevation_choices"])
    with pytest.raises(ValueError, match="elevation_choices is empty"):
        RandomCameraConfig(elevation_choices=[])


def test_progressive_resolution_batch_size_and_ranges_follow_the_step():
    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset

    config = RandomCameraConfig(
        height=[16, 32], width=[16, 24], batch_size=[4, 2], resolution_milestones=[10], progressive_until=20
    )
    dataset = RandomCameraDataset(config, seed=1, num_steps=30)
    early, late = dataset[9], dataset[10]
    assert (len(early), early.height, early.width) == (4, 16, 16)
    assert (len(late), late.height, late.width) == (2, 32, 24)
    assert torch.allclose(dataset[0].elevation_deg, torch.full((4,), 15.0))
    assert torch.allclose(dataset[0].azimuth_deg, torch.zeros(4))
    assert config.ranges_at(25) == (config.elevation_range, config.azimuth_range)
    with pytest.raises(ValueError):
        RandomCameraConfig(height=[16, 32])


def test_datamodule_train_loader_yields_step_batches_and_turntables():
    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataModule

    module = RandomCameraDataModule(
        RandomCameraConfig(batch_size=2), seed=3, num_steps=6, eval_height=8, eval_width=8, n_test_views=5
    )
    loader = module.train_dataloader()
    assert loader.num_workers == 0 and len(loader) == 6
    batches = list(loader)
    _assert_same_cameras(batches[4], loader.dataset[4])
    test = list(module.test_dataloader())
    assert len(test) == 5 and len(test[0]) == 1 and test[0].height == 8
    assert torch.allclose(torch.cat([c.azimuth_deg for c in test]), torch.arange(5) * 72.0)
    assert torch.allclose(test[0].positions.norm(), torch.tensor(1.5))


def test_single_image_datamodule_pairs_reference_view_with_step_cameras(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from recipes.data.random_cameras import RandomCameraConfig
    from recipes.data.single_image import ReferenceViewConfig, SingleImageDataModule

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)
    iio.imwrite(tmp_path / "ref.png", rgba)
    reference = ReferenceViewConfig(height=[8, 16], width=[8, 16], resolution_milestones=[3])
    module = SingleImageDataModule(
        str(tmp_path / "ref.png"),
        reference=reference,
        cameras=RandomCameraConfig(batch_size=3),
        seed=2,
        num_steps=5,
    )
    dataset = module.train_dataset()
    first, later = dataset[0], dataset[3]
    assert first.rgb.shape == (1, 8, 8, 3) and later.mask.shape == (1, 16, 16, 1)
    assert first.mask[0, 4, 4, 0] == 1.0 and first.mask[0, 0, 0, 0] == 0.0
    assert torch.allclose(first.rgb[0, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    assert first.reference.height == 8 and len(first.random) == 3
    ref_position = first.reference.positions[0]
    assert torch.allclose(ref_position.norm(), torch.tensor(3.8))
    assert ref_position[2] == pytest.approx(3.8 * math.sin(math.radians(5.0)), abs=1e-5)
    _assert_same_cameras(first.random, dataset[0].random)
    assert not torch.equal(first.random.c2w, dataset[1].random.c2w)
    assert first.to("cpu").rgb.shape == first.rgb.shape
    test = list(module.test_dataloader())
    assert len(test) == 120 and torch.allclose(test[0].positions, first.reference.positions)


def test_the_training_loader_resumes_at_the_checkpoints_step():
    from types import SimpleNamespace

    from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset, ResumableStepLoader

    dataset = RandomCameraDataset(RandomCameraConfig(batch_size=2), seed=3, num_steps=6)
    datamodule = SimpleNamespace(trainer=SimpleNamespace(global_step=4))
    loader = ResumableStepLoader(dataset, datamodule)
    assert loader.state_dict() == {"next_step": 4}
    loader.load_state_dict({"next_step": 4})
    resumed = list(loader)
    assert len(resumed) == 2 and torch.equal(resumed[0].c2w, dataset[4].c2w)
    assert len(list(loader)) == 6, "the next epoch starts at step 0"
    assert ResumableStepLoader(dataset).state_dict() == {"next_step": 0}
