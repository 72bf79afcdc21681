"""The shared text-to-3D system: one LightningModule composed from a scene, guidance and schedules (and its
image-to-3D extension)."""

from recipes.system.dmtet_scene import DMTetGrid, DMTetOptimizer, DMTetScene
from recipes.system.gaussian_scene import GaussianInit, GaussianScene
from recipes.system.guidance import ClosedFormPriorConfig, Guidance, GuidanceConfig
from recipes.system.image_to_3d import ImageTo3D, ReferenceLossWeights
from recipes.system.module import TextTo3D
from recipes.system.nerf_scene import NeRFOptimizer, NeRFScene
from recipes.system.scene import Scene
from recipes.system.sdf_scene import SDFOptimizer, SDFScene

__all__ = [
    "ClosedFormPriorConfig",
    "DMTetGrid",
    "DMTetOptimizer",
    "DMTetScene",
    "GaussianInit",
    "GaussianScene",
    "Guidance",
    "GuidanceConfig",
    "ImageTo3D",
    "NeRFOptimizer",
    "NeRFScene",
    "ReferenceLossWeights",
    "SDFOptimizer",
    "SDFScene",
    "Scene",
    "TextTo3D",
]
