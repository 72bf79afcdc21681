"""Quality measures for generated 3D objects: image metrics and novel views against a ground truth."""

from recipes.eval.metrics import psnr, ssim
from recipes.eval.novel_views import NovelViewQuality, novel_view_quality, silhouette_iou

__all__ = ["NovelViewQuality", "novel_view_quality", "psnr", "silhouette_iou", "ssim"]
