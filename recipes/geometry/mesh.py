"""Triangle meshes: normals, edges and the smoothness regularizers of Magic3D / ProlificDreamer.

Faces are counter-clockwise seen from outside, so face normals point outwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TriangleMesh:
    """``vertices [V, 3]`` (float, may require grad) and ``faces [F, 3]`` (long)."""

    vertices: Tensor
    faces: Tensor

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[0]

    def face_normals(self, normalize: bool = True) -> Tensor:
        """``[F, 3]`` outward normals (area-weighted if not normalised)."""
        a, b, c = self.vertices[self.faces].unbind(1)
        normal = torch.linalg.cross(b - a, c - a, dim=-1)
        return torch.nn.functional.normalize(normal, dim=-1) if normalize else normal

    def vertex_normals(self) -> Tensor:
        """``[V, 3]`` unit normals: area-weighted average of the adjacent face normals."""
        weighted = self.face_normals(normalize=False)
        normals = torch.zeros_like(self.vertices)
        for corner in range(3):
            normals = normals.index_add(0, self.faces[:, corner], weighted)
        return torch.nn.functional.normalize(normals, dim=-1)

    def edges(self) -> Tensor:
        """Unique undirected edges ``[E, 2]`` (smaller index first)."""
        return unique_edges(self.faces)[0]

    def area(self) -> Tensor:
        """Total surface area."""
        return 0.5 * self.face_normals(normalize=False).norm(dim=-1).sum()

    def volume(self) -> Tensor:
        """Signed enclosed volume (positive for a closed, outward-oriented mesh)."""
        a, b, c = self.vertices[self.faces].unbind(1)
        return (a * torch.linalg.cross(b, c, dim=-1)).sum() / 6.0


def unique_edges(faces: Tensor) -> tuple[Tensor, Tensor]:
    """Unique undirected edges ``[E, 2]`` of ``faces`` and, for each of the 3F face edges, its edge index.

    Face edge ``3·f + k`` runs from corner k to corner (k + 1) mod 3 of face f.
    """
    directed = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1).reshape(-1, 2)
    undirected = directed.sort(dim=-1).values
    edges, inverse = torch.unique(undirected, dim=0, return_inverse=True)
    return edges, inverse


def edge_faces(faces: Tensor) -> tuple[Tensor, Tensor]:
    """Edges ``[E, 2]`` and their two adjacent faces ``[E, 2]`` (the second is −1 on boundary edges).

    Non-manifold edges keep two of their faces.
    """
    edges, inverse = unique_edges(faces)
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat_interleave(3)
    order = torch.argsort(inverse, stable=True)
    sorted_edges, sorted_faces = inverse[order], face_of[order]
    first = torch.ones_like(sorted_edges, dtype=torch.bool)
    first[1:] = sorted_edges[1:] != sorted_edges[:-1]
    adjacent = torch.full((edges.shape[0], 2), -1, dtype=torch.long, device=faces.device)
    adjacent[sorted_edges[first], 0] = sorted_faces[first]
    second = ~first
    second[1:] &= first[:-1]  # only the second occurrence of each edge
    adjacent[sorted_edges[second], 1] = sorted_faces[second]
    return edges, adjacent


def normal_consistency_loss(mesh: TriangleMesh) -> Tensor:
    """Mean of ``1 − cos(n_i, n_j)`` over the edges (i, j), with vertex normals (threestudio's ``normal_consistency``)."""
    normals = mesh.vertex_normals()
    edges = mesh.edges()
    return (1 - torch.cosine_similarity(normals[edges[:, 0]], normals[edges[:, 1]], dim=-1)).mean()


def laplacian_loss(mesh: TriangleMesh) -> Tensor:
    """Mean norm of the uniform graph Laplacian ``deg(v)·v − Σ neighbours of v`` (threestudio's ``laplacian``).

    Unnormalised like threestudio's (whose loss weights assume it): a vertex with six neighbours
    weighs six times its offset from their centroid.
    """
    edges = mesh.edges()
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    v = mesh.vertices
    neighbour_sum = torch.zeros_like(v).index_add(0, src, v[dst])
    degree = torch.zeros(v.shape[0], device=v.device, dtype=v.dtype).index_add(
        0, src, torch.ones_like(src, dtype=v.dtype)
    )
    laplacian = degree[:, None] * v - neighbour_sum
    return laplacian.norm(dim=-1).mean()
