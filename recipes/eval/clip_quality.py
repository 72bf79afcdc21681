"""CLIP R-Precision and CLIP-FID of generated objects, measured on their turntable frames.

- **CLIP R-Precision** (DreamFusion's, top-1): each frame of a run's turntable is ranked against the prompts of all
  the runs evaluated together; the frame counts as correct when its own run's prompt has the highest cosine
  similarity. A run's value is its fraction of correct frames.
- **CLIP-FID**: the Fréchet distance between CLIP image embeddings of the turntable frames and of a folder of
  reference images (torchmetrics' ``FrechetInceptionDistance`` with :class:`ClipImageFeatures` as its feature
  extractor; no torch-fidelity needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipModelNotFoundError(FileNotFoundError):
    """The CLIP model is neither a local folder nor in the Hugging Face cache."""


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings (the projected ``image_embeds``) of images ``[B, 3, H, W]`` in [0, 1].

    Images are resized (shorter side) and centre-cropped to the model's input size, then normalised with the
    model's mean and std. ``num_features`` is what torchmetrics' FID reads for its state size.

    Args:
        model: a ``transformers.CLIPModel``.
        mean: per-channel normalisation mean. Default is OpenAI CLIP's.
        std: per-channel normalisation std. Default is OpenAI CLIP's.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.size = int(model.config.vision_config.image_size)
        self.num_features = int(model.config.projection_dim)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        images = images.float()
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        images = nn.functional.interpolate(
            images, size=resized, mode="bicubic", antialias=True, align_corners=False
        )
        top, left = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
        images = images[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        output = self.model.get_image_features(pixel_values=self.preprocess(images))
        return getattr(output, "pooler_output", output)


@dataclass
class Clip:
    """A loaded CLIP: image features and text embeddings."""

    features: ClipImageFeatures
    tokenizer: object

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        model = self.features.model
        max_length = min(int(model.config.text_config.max_position_embeddings), 77)
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        output = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return getattr(output, "pooler_output", output)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor, batch_size: int = 16) -> Tensor:
        return torch.cat(
            [self.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )


def load_clip(name_or_path: str) -> Clip:
    """A CLIP model and tokenizer from a local folder or a Hugging Face id in the cache (offline-safe); raises
    :class:`ClipModelNotFoundError` when neither has it."""
    from transformers import AutoTokenizer, CLIPModel

    advice = (
        "pass --clip a local folder holding a transformers CLIPModel and its tokenizer, or a Hub id already in the "
        "cache (e.g. download openai/clip-vit-base-patch32 once with network access)"
    )
    if (name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()) and not Path(
        name_or_path
    ).expanduser().is_dir():
        raise ClipModelNotFoundError(f"CLIP model folder {name_or_path} does not exist; {advice}")
    try:
        model = CLIPModel.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise ClipModelNotFoundError(
            f"CLIP model {name_or_path!r} was not found ({reason}); {advice}"
        ) from None
    mean, std = _normalisation(name_or_path)
    return Clip(ClipImageFeatures(model, mean, std), tokenizer)


def _normalisation(name_or_path: str) -> tuple[Sequence[float], Sequence[float]]:
    """``image_mean`` and ``image_std`` of the model's ``preprocessor_config.json``, else OpenAI CLIP's."""
    import json

    from transformers.utils import cached_file

    path = cached_file(name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    config = json.loads(Path(path).read_text()) if path else {}
    return config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)


def r_precision(
    image_embeddings: Sequence[Tensor], prompts: Sequence[str], text_embeddings: Tensor
) -> list[float]:
    """Top-1 CLIP R-Precision per run: ``image_embeddings[i]`` ``[N_i, D]`` are run i's frames, ``prompts[i]`` its
    prompt, ``text_embeddings`` ``[P, D]`` those of the distinct prompts in first-seen order."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) != len(text_embeddings):
        raise ValueError(f"{len(text_embeddings)} text embeddings for {len(distinct)} distinct prompts")
    texts = nn.functional.normalize(text_embeddings.float(), dim=-1)
    values = []
    for frames, prompt in zip(image_embeddings, prompts, strict=True):
        similarity = nn.functional.normalize(frames.float(), dim=-1) @ texts.T
        values.append((similarity.argmax(dim=1) == distinct.index(prompt)).float().mean().item())
    return values


def clip_similarity(
    image_embeddings: Sequence[Tensor], prompts: Sequence[str], text_embeddings: Tensor
) -> list[float]:
    """CLIP similarity per run: the cosine of each frame's embedding with its own prompt's, averaged over the run's
    frames (ScaleDreamer's "CLIP similarity"); arguments as for :func:`r_precision`."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) != len(text_embeddings):
        raise ValueError(f"{len(text_embeddings)} text embeddings for {len(distinct)} distinct prompts")
    texts = nn.functional.normalize(text_embeddings.float(), dim=-1)
    return [
        (nn.functional.normalize(frames.float(), dim=-1) @ texts[distinct.index(prompt)]).mean().item()
        for frames, prompt in zip(image_embeddings, prompts, strict=True)
    ]


def clip_fid(
    features: ClipImageFeatures, reference: Tensor, generated: Tensor, batch_size: int = 16
) -> float:
    """FID between the CLIP embeddings of ``reference`` and ``generated`` images ``[N, 3, H, W]`` in [0, 1]
    (each N ≥ 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
    for images, real in ((reference, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size], real=real)
    return float(metric.compute())


def read_images(folder: str | Path) -> Tensor:
    """The images of a folder (png, jpg, webp, bmp; sorted by name) as ``[N, 3, H, W]`` in [0, 1], resized to the
    first image's size."""
    import imageio.v3 as iio

    folder = Path(folder)
    paths = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )
    if len(paths) < 2:
        raise FileNotFoundError(
            f"reference folder {folder} has {len(paths)} images; CLIP-FID needs at least 2 (png/jpg/webp/bmp)"
        )
    images = [_to_chw(iio.imread(p)) for p in paths]
    size = images[0].shape[-2:]
    return torch.stack(
        [
            img
            if img.shape[-2:] == size
            else nn.functional.interpolate(img[None], size=size, mode="bilinear")[0]
            for img in images
        ]
    )


def read_video(path: str | Path) -> Tensor:
    """The frames of an ``.mp4`` or ``.gif`` as ``[N, 3, H, W]`` in [0, 1]."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        frames = [_to_chw(frame) for frame in reader]
    finally:
        reader.close()
    return torch.stack(frames)


def _to_chw(image) -> Tensor:
    array = torch.as_tensor(image)
    if array.dim() == 2:
        array = array[..., None].expand(-1, -1, 3)
    return array[..., :3].permute(2, 0, 1).float() / 255.0


def fmt(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"
