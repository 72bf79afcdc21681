"""Forward+backward time of one rendered view through the NeRF and the SDF representation on CPU.

Each representation: the torch hash grid with threestudio's sizes (16 levels × 2 features, 2^19 entries;
TextMesh's progressive grid for the SDF with every level enabled), the volume/NeuS renderer with the
diffuse point-light material and the neural environment-map background, one random view of the
step-indexed camera dataset. The occupancy grid is refreshed once from the initial field (the density
blob / the sphere), as at step 0 of training.

Run: .venv/bin/python benchmarks/fields_cpu.py --size 64 --samples 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recipes.data.random_cameras import RandomCameraConfig, RandomCameraDataset
from recipes.geometry.nerf import ImplicitVolume, ImplicitVolumeConfig
from recipes.geometry.sdf import ImplicitSDF, ImplicitSDFConfig, eikonal_loss
from recipes.render.background import NeuralEnvironmentMapBackground
from recipes.render.materials import DiffusePointLightConfig, DiffusePointLightMaterial
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.render.occupancy import OccupancyGridConfig
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig


def build(kind: str, samples: int, occupancy: bool) -> torch.nn.Module:
    material = DiffusePointLightMaterial(DiffusePointLightConfig(ambient_only_steps=0))
    background = NeuralEnvironmentMapBackground()
    grid = OccupancyGridConfig(enabled=occupancy)
    if kind == "nerf":
        field = ImplicitVolume(ImplicitVolumeConfig(normal_type="analytic"))
        renderer = VolumeRenderer(field, material, background, VolumeRendererConfig(samples, occupancy=grid))
    else:
        field = ImplicitSDF(ImplicitSDFConfig())
        renderer = NeuSRenderer(field, material, background, NeuSRendererConfig(samples, occupancy=grid))
    renderer.update_step(10_000)  # every hash-grid level on, occupancy grid refreshed once
    return renderer.train()


def time_step(renderer: torch.nn.Module, cameras, kind: str) -> tuple[float, int]:
    renderer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = renderer(cameras, shading="diffuse", generator=torch.Generator().manual_seed(0))
    loss = out["comp_rgb"].mean()
    if kind == "sdf":
        loss = loss + eikonal_loss(out["sdf_gradient"])
    loss.backward()
    return time.perf_counter() - start, out["weights"].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="samples along the box diagonal")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--no-occupancy", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RandomCameraConfig(
        height=args.size, width=args.size, batch_size=1, camera_distance_range=(2.0, 2.0)
    )
    cameras = RandomCameraDataset(config, seed=0, num_steps=1)[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
        f"{args.samples} samples/diagonal, occupancy {'off' if args.no_occupancy else 'on'}"
    )
    for kind in ("nerf", "sdf"):
        torch.manual_seed(0)
        renderer = build(kind, args.samples, not args.no_occupancy)
        time_step(renderer, cameras, kind)  # warm-up
        timings, n_samples = zip(*(time_step(renderer, cameras, kind) for _ in range(args.repeats)))
        params = sum(p.numel() for p in renderer.parameters())
        print(
            f"{kind}: fwd+bwd median {1000 * statistics.median(timings):.0f} ms "
            f"(min {1000 * min(timings):.0f}), {n_samples[0]} field samples, {params / 1e6:.1f} M params"
        )


if __name__ == "__main__":
    main()
