"""Export: meshes from any representation (.obj/.ply/.glb, vertex colours or baked textures), turntable
videos (.mp4/.gif) and image grids."""

from recipes.export.mesh import (
    GaussianDensityField,
    TexturedMesh,
    bake_texture,
    export_mesh,
    marching_cubes,
    save_mesh,
)
from recipes.export.video import image_grid, render_turntable, save_image, save_turntable, write_video

__all__ = [
    "GaussianDensityField",
    "TexturedMesh",
    "bake_texture",
    "export_mesh",
    "image_grid",
    "marching_cubes",
    "render_turntable",
    "save_image",
    "save_mesh",
    "save_turntable",
    "write_video",
]
