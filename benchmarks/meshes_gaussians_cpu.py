"""Forward+backward time on this CPU of the pure-torch 3D paths: Gaussian splatting and a DMTet mesh.

Run: python benchmarks/meshes_gaussians_cpu.py [--size 64] [--gaussians 2000] [--tet-resolution 32] [--repeats 5]
Prints the median over ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recipes.data.cameras import cameras_from_spherical
from recipes.geometry.dmtet import DMTetGeometry
from recipes.geometry.gaussians import Gaussians
from recipes.geometry.mesh import laplacian_loss, normal_consistency_loss
from recipes.render.gaussians_raster import render_gaussians
from recipes.render.mesh_raster import render_mesh


def camera(size: int):
    one = torch.ones(1)
    return cameras_from_spherical(20 * one, 30 * one, 2.5 * one, 49.1 * one, size, size)


def median_seconds(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gaussians", type=int, default=2000)
    parser.add_argument("--tet-resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cams = camera(args.size)
    background = torch.ones(3)

    gaussians = Gaussians(num_points=args.gaussians, radius=0.5)
    with torch.no_grad():
        gaussians.opacity_logits.fill_(0.0)

    def gaussian_step() -> None:
        gaussians.zero_grad(set_to_none=True)
        render_gaussians(gaussians, cams, background).rgb.mean().backward()

    dmtet = DMTetGeometry(resolution=args.tet_resolution, radius=1.0)
    dmtet.initialize_from_field(lambda p: p.norm(dim=-1) - 0.5, kind="sdf")
    faces = []

    def dmtet_step() -> None:
        dmtet.zero_grad(set_to_none=True)
        mesh = dmtet.isosurface()
        faces.append(mesh.faces.shape[0])
        out = render_mesh(mesh, cams, background=background)
        loss = out.rgb.mean() + 1e-3 * normal_consistency_loss(mesh) + 1e-3 * laplacian_loss(mesh)
        loss.backward()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}x{args.size}")
    t = median_seconds(gaussian_step, args.repeats)
    print(f"gaussians  N={args.gaussians:<6d} forward+backward {1000 * t:7.1f} ms")
    t = median_seconds(dmtet_step, args.repeats)
    print(
        f"dmtet      grid {args.tet_resolution}^3 ({dmtet.tets.shape[0]} tets, {faces[-1]} faces) "
        f"marching tets + raster + losses forward+backward {1000 * t:7.1f} ms"
    )


if __name__ == "__main__":
    main()
