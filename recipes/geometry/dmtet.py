"""DMTet geometry (Magic3D refine, ProlificDreamer geometry/texture stages): an SDF and a deformation on
a tetrahedral grid, turned into a mesh by marching tetrahedra on every forward.

``initialize_from_field`` converts a trained NeRF or SDF given as any callable ``field(points) -> values``
(threestudio's ``create_from``), so this module does not depend on a particular network class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from recipes.geometry.mesh import TriangleMesh
from recipes.geometry.tets import cube_tet_grid, marching_tetrahedra


class DMTetGeometry(nn.Module):
    """Signed distances ``sdf [V]`` (negative inside) and offsets ``deformation [V, 3]`` on a cube tet grid.

    Args:
        resolution: cubes per axis (6·r³ tets). 64 has about as many vertices as threestudio's
            ``128_tets`` quartet grid; tests use 8–16.
        radius: the grid spans ``[−radius, radius]³`` (threestudio's ``isosurface_bbox``).
        deformable: learn per-vertex offsets, each bounded to half a cell by ``tanh``.
    """

    def __init__(self, resolution: int = 64, radius: float = 1.0, deformable: bool = True) -> None:
        super().__init__()
        vertices, tets = cube_tet_grid(resolution, radius)
        self.resolution, self.radius = resolution, radius
        self.register_buffer("grid_vertices", vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.sdf = nn.Parameter(torch.zeros(vertices.shape[0]))
        self.deformation = nn.Parameter(torch.zeros_like(vertices), requires_grad=deformable)

    @property
    def cell_size(self) -> float:
        return 2 * self.radius / self.resolution

    def vertices(self) -> Tensor:
        """Deformed grid vertices ``[V, 3]``."""
        return self.grid_vertices + 0.5 * self.cell_size * torch.tanh(self.deformation)

    def isosurface(self) -> TriangleMesh:
        """The current surface (differentiable w.r.t. ``sdf`` and ``deformation``)."""
        return marching_tetrahedra(self.vertices(), self.tets, self.sdf)

    def forward(self) -> TriangleMesh:
        return self.isosurface()

    def fix_geometry(self) -> None:
        """Freeze shape (ProlificDreamer's texture stage trains only appearance)."""
        self.sdf.requires_grad_(False)
        self.deformation.requires_grad_(False)

    @torch.no_grad()
    def initialize_from_field(
        self,
        field: Callable[[Tensor], Tensor],
        kind: Literal["density", "sdf"] = "density",
        threshold: float = 10.0,
        chunk: int = 65536,
        clamp: float = 1.0,
    ) -> None:
        """Set ``sdf`` from a trained field evaluated at the grid vertices; zero the deformation.

        ``kind="density"``: the surface is ``density = threshold`` and the SDF is ``threshold − density``
        (threestudio's implicit-volume conversion with its ``isosurface_threshold``; pass the level that
        outlines the coarse NeRF). ``kind="sdf"``: the field is
        an SDF (negative inside) and ``threshold`` is ignored. Values are clamped to ``±clamp`` as in
        threestudio, so the grid SDF stays in a trainable range.
        """
        points = self.grid_vertices
        values = torch.cat([field(p).reshape(-1) for p in points.split(chunk)]).to(points)
        sdf = values if kind == "sdf" else threshold - values
        self.sdf.copy_(sdf.clamp(-clamp, clamp))
        self.deformation.zero_()
