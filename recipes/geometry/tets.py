"""Tetrahedral grids generated in code, and marching tetrahedra (differentiable in positions and SDF).

The grid splits each cube of a regular r³ lattice into six tetrahedra around its main diagonal
(the Kuhn / Freudenthal triangulation). Every cube uses the same diagonal, so faces match across
cubes and the grid is conforming; all tetrahedra are positively oriented. A cube grid of resolution
64 has 65³ ≈ 275k vertices, about the size of threestudio's quartet-generated ``128_tets.npz``.
"""

from __future__ import annotations

from itertools import permutations

import torch
from torch import Tensor

from recipes.geometry.mesh import TriangleMesh

TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
"""The six edges of a tetrahedron as corner pairs; marching tets refers to them by position."""


def cube_tet_grid(resolution: int, radius: float = 1.0) -> tuple[Tensor, Tensor]:
    """Vertices ``[(r+1)³, 3]`` spanning ``[−radius, radius]³`` and positively oriented tets ``[6r³, 4]``."""
    r = resolution
    axis = torch.linspace(-radius, radius, r + 1)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)

    def index(i: Tensor, j: Tensor, k: Tensor) -> Tensor:
        return (i * (r + 1) + j) * (r + 1) + k

    corner = torch.stack(torch.meshgrid(*(torch.arange(r),) * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    tets = []
    for order in permutations(range(3)):
        path = [corner]
        for axis_index in order:
            step = torch.zeros(3, dtype=torch.long)
            step[axis_index] = 1
            path.append(path[-1] + step)
        tet = torch.stack([index(*p.unbind(-1)) for p in path], dim=-1)
        odd = sum(1 for a in range(3) for b in range(a + 1, 3) if order[a] > order[b]) % 2 == 1
        if odd:  # an odd permutation gives a negatively oriented tet: swap two corners
            tet = tet[:, [0, 1, 3, 2]]
        tets.append(tet)
    return vertices, torch.cat(tets)


def _triangle_table() -> tuple[Tensor, Tensor]:
    """For each of the 16 inside/outside patterns of a tet: up to two triangles over its edges, ``[16, 2, 3]``.

    Built on the reference tet (origin + unit axes, positively oriented) by orienting every triangle so
    its normal points from the inside corners to the outside ones; affine maps with positive
    determinant keep that orientation for every tet of the grid.
    """
    corners = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    midpoint = torch.stack([(corners[a] + corners[b]) / 2 for a, b in TET_EDGES])
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    for code in range(16):
        inside = [(code >> i) & 1 == 1 for i in range(4)]
        if all(inside) or not any(inside):
            continue
        outward = corners[[i for i in range(4) if not inside[i]]].mean(0) - corners[
            [i for i in range(4) if inside[i]]
        ].mean(0)
        crossing = [e for e, (a, b) in enumerate(TET_EDGES) if inside[a] != inside[b]]
        if len(crossing) == 3:
            triangles = [crossing]
        else:  # a quad: walk its four edges so consecutive ones share a corner, then fan it
            ring, rest = [crossing[0]], crossing[1:]
            while rest:
                nxt = next(e for e in rest if set(TET_EDGES[e]) & set(TET_EDGES[ring[-1]]))
                ring.append(nxt)
                rest.remove(nxt)
            triangles = [[ring[0], ring[1], ring[2]], [ring[0], ring[2], ring[3]]]
        for t, tri in enumerate(triangles):
            p = midpoint[tri]
            if torch.dot(torch.linalg.cross(p[1] - p[0], p[2] - p[0]), outward) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, t] = torch.tensor(tri)
    return table


TRIANGLE_TABLE = _triangle_table()


def marching_tetrahedra(vertices: Tensor, tets: Tensor, sdf: Tensor) -> TriangleMesh:
    """Zero level set of ``sdf [V]`` (negative inside) over ``tets``, as a closed outward-oriented mesh.

    One mesh vertex per grid edge whose ends have opposite signs, placed where the linear
    interpolation of the SDF vanishes, so the mesh is watertight and its vertices are differentiable
    w.r.t. both ``vertices`` (DMTet's deformation) and ``sdf``.
    """
    inside = sdf < 0
    tet_inside = inside[tets]
    count = tet_inside.sum(-1)
    active = (count > 0) & (count < 4)
    tets = tets[active]
    weights = torch.tensor([1, 2, 4, 8], device=tets.device)
    codes = (tet_inside[active].long() * weights).sum(-1)

    tet_edges = tets[:, torch.tensor(TET_EDGES, device=tets.device)].reshape(-1, 2).sort(dim=-1).values
    edges, inverse = torch.unique(tet_edges, dim=0, return_inverse=True)
    crossing = inside[edges[:, 0]] != inside[edges[:, 1]]
    vertex_of_edge = torch.full((edges.shape[0],), -1, dtype=torch.long, device=tets.device)
    vertex_of_edge[crossing] = torch.arange(int(crossing.sum()), device=tets.device)
    a, b = edges[crossing].unbind(-1)
    t = (sdf[a] / (sdf[a] - sdf[b]))[:, None]
    mesh_vertices = vertices[a] + t * (vertices[b] - vertices[a])

    per_tet = vertex_of_edge[inverse].reshape(-1, 6)
    table = TRIANGLE_TABLE.to(tets.device)[codes]  # [T, 2, 3]
    faces = torch.gather(per_tet[:, None, :].expand(-1, 2, -1), 2, table.clamp_min(0))
    faces = faces[table[..., 0] >= 0]
    return TriangleMesh(vertices=mesh_vertices, faces=faces)
