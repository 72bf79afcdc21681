"""Forward+backward time of ScaleDreamer's 3DConv-net generator on CPU, and its parameter count at full size.

For each size: one (embedding, noise) → feature grid (``synthesize``), then one NeuS view (``NoMaterial``, solid
background, no occupancy grid, finite-difference normals) of the field, then backward of the mean colour into every
generator parameter. Times are wall-clock medians over ``--repeats`` runs after one warm-up. The full size
(ScaleDreamer's 128³ × 32, channel multiplier 1 and 2) is counted on the ``meta`` device: its parameters are
computed from the layer shapes, nothing runs.

Run from the repository root: ``.venv/bin/python benchmarks/conv3d_generator.py [--repeats 3] [--view 32]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.data.cameras import orbit_cameras
from recipes.geometry.conv3d_generator import Conv3DGenerator, Conv3DGeneratorConfig
from recipes.geometry.mlp import MLPConfig
from recipes.render.background import SolidColorBackground, SolidColorConfig
from recipes.render.materials import NoMaterial
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.render.occupancy import OccupancyGridConfig

SIZES = {
    "tiny": Conv3DGeneratorConfig.tiny(),
    "mid": Conv3DGeneratorConfig(
        resolution=64, channels=(128, 128, 64, 32, 16), mlp=MLPConfig(n_neurons=64)
    ),  # full-size mapping (1024-d embedding, 64-d noise, 256-d style) and 32 output channels, at 64³
}
FULL = {
    "full, m = 1 (50k/100k configs)": Conv3DGeneratorConfig(),
    "full, m = 2 (300k config)": Conv3DGeneratorConfig(channels=(512, 512, 512, 512, 256, 128)),
}


def count(config: Conv3DGeneratorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Conv3DGenerator(config).parameters())


def measure(config: Conv3DGeneratorConfig, view: int, samples: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    generator = Conv3DGenerator(config)
    embedding, noise = torch.randn(config.embedding_dim), torch.randn(config.noise_dim)
    cameras = orbit_cameras(1, elevation_deg=15.0, distance=3.5, fovy_deg=45.0, height=view, width=view)
    renderer_config = NeuSRendererConfig(
        num_samples_per_ray=samples, occupancy=OccupancyGridConfig(enabled=False)
    )
    background = SolidColorBackground(SolidColorConfig((1.0, 1.0, 1.0)))
    times: dict[str, list[float]] = {"synthesize": [], "render": [], "backward": [], "total": []}
    for repeat in range(repeats + 1):
        generator.zero_grad(set_to_none=True)
        start = time.perf_counter()
        field = generator.condition(embedding, noise)
        synthesized = time.perf_counter()
        renderer = NeuSRenderer(field, NoMaterial(), background, renderer_config).train()
        out = renderer(cameras, generator=torch.Generator().manual_seed(repeat))
        rendered = time.perf_counter()
        out["comp_rgb"].mean().backward()
        done = time.perf_counter()
        if repeat == 0:
            continue  # warm-up
        times["synthesize"].append(synthesized - start)
        times["render"].append(rendered - synthesized)
        times["backward"].append(done - rendered)
        times["total"].append(done - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    medians["parameters"] = sum(p.numel() for p in generator.parameters())
    medians["queries"] = int(out["weights"].shape[0])
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--view", type=int, default=32, help="side of the rendered view in pixels")
    parser.add_argument("--samples", type=int, default=64, help="NeuS samples per box diagonal")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| size | grid | parameters | field samples | synthesize | render | backward | total |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.sizes:
        config = SIZES[name]
        m = measure(config, args.view, args.samples, args.repeats)
        grid = f"{config.resolution}³ × {config.feature_channels}"
        print(
            f"| {name} | {grid} | {m['parameters']:,} | {m['queries']:,} | {m['synthesize']:.3f} s | "
            f"{m['render']:.3f} s | {m['backward']:.3f} s | {m['total']:.3f} s |"
        )
    for name, config in FULL.items():
        grid_mib = config.feature_channels * config.resolution**3 * 4 / 2**20
        print(
            f"{name}: {count(config):,} parameters (computed); output grid {grid_mib:.0f} MiB fp32 per prompt"
        )


if __name__ == "__main__":
    main()
