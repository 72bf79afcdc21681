"""Export: meshes from any representation (.obj/.ply/.glb, vertex colours or baked textures), turntable
videos (.mp4/.gif) and image grids."""

from recipes.export.mesh import (
    GaussianColorField,
    GaussianDensityField,
    TexturedMesh,
    auto_density_threshold,
    bake_texture,
    export_mesh,
    export_nerf_mesh,
    marching_cubes,
    nerf_mesh,
    save_mesh,
)
from recipes.export.video import image_grid, render_turntable, save_image, save_turntable, write_video

__all__ = [
    "GaussianColorField",
    "GaussianDensityField",
    "TexturedMesh",
    "auto_density_threshold",
    "bake_texture",
    "export_mesh",
    "export_nerf_mesh",
    "image_grid",
    "marching_cubes",
    "nerf_mesh",
    "render_turntable",
    "save_image",
    "save_mesh",
    "save_turntable",
    "write_video",
]
