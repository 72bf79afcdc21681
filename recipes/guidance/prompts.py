"""Prompt processing: text embeddings computed once, cached on disk, the text encoder freed afterwards.

View-dependent prompting follows DreamFusion/threestudio: every view gets ``"<prompt>, <direction> view"``
with direction chosen from the camera's azimuth and elevation (side by default; front when
|azimuth| < front_threshold; back when |azimuth| > 180 − back_threshold; overhead when
elevation > overhead_threshold, which wins over the others). The negative prompt (empty by default) is
the unconditional branch of CFG.

Perp-Neg (``perp_neg: true``, threestudio's ``use_perp_neg``): the positive prompt is interpolated
between neighbouring directions by azimuth (front↔side for |azimuth| < 90°, side↔back beyond), and the
two directions it lies between become negative prompts with weights ``−(a·exp(−b·r) + c)`` of the
interpolation ratio r (:func:`perp_neg_views`); overhead views use the overhead prompt and no negatives.
:meth:`PromptEmbeddings.for_views` then returns a :class:`~recipes.guidance.cfg.PerpNegCondition`, which
every loss built on :func:`~recipes.guidance.cfg.predict_guided_noise` (SDS, VSD's pretrained term, the
first ASD term) combines by Perp-Neg.

The cache is keyed by the text-encoder identity and the exact text, one file per text under
``cache_dir``, written atomically so several ranks may fill it at once.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from recipes.guidance.cfg import PerpNegCondition
from recipes.guidance.loading import TorchDType, default_device, load_pretrained, resolve_dtype

VIEW_DIRECTIONS: tuple[str, ...] = ("side", "front", "back", "overhead")
DEFAULT_CACHE_DIR = ".lightning_picard_cache/text_embeddings"

ShiftedExponential = tuple[float, float, float]
"""``(a, b, c)`` of ``f(r) = a·exp(−b·r) + c``, a Perp-Neg negative weight as a function of the ratio r."""


@dataclass
class PromptConfig:
    """What to say to the diffusion model.

    Attributes:
        prompt: the text prompt.
        negative_prompt: the unconditional branch of CFG ("" is the plain unconditional prediction).
        view_dependent: append ", front view" etc. according to the camera.
        front_threshold, back_threshold, overhead_threshold: degrees; threestudio's defaults are
            45/45/60, ProlificDreamer and ScaleDreamer use 30/30 for front/back.
        cache_dir: where embeddings are cached (created on demand).
        perp_neg: Perp-Neg guidance with interpolated directional prompts (needs ``view_dependent``).
            Default is False.
        perp_neg_f_sb, perp_neg_f_fsb, perp_neg_f_fs, perp_neg_f_sf: ``(a, b, c)`` of the negative
            weights (threestudio's defaults): side when between side and back, front when between side
            and back, front when between front and side, side when between front and side.
    """

    prompt: str = "a delicious hamburger"
    negative_prompt: str = ""
    view_dependent: bool = True
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    cache_dir: str = DEFAULT_CACHE_DIR
    perp_neg: bool = False
    perp_neg_f_sb: ShiftedExponential = (1.0, 0.5, -0.606)
    perp_neg_f_fsb: ShiftedExponential = (1.0, 0.5, 0.967)
    perp_neg_f_fs: ShiftedExponential = (4.0, 0.5, -2.426)
    perp_neg_f_sf: ShiftedExponential = (4.0, 0.5, -2.426)

    def __post_init__(self) -> None:
        if self.perp_neg and not self.view_dependent:
            raise ValueError(
                "perp_neg: true needs view_dependent: true (Perp-Neg mixes the directional prompts)"
            )

    def directional_prompts(self) -> list[str]:
        """One prompt per entry of :data:`VIEW_DIRECTIONS`."""
        return [f"{self.prompt}, {direction} view" for direction in VIEW_DIRECTIONS]


def _shifted_exponential(f: ShiftedExponential, r: torch.Tensor) -> torch.Tensor:
    a, b, c = f
    return a * torch.exp(-b * r) + c


@dataclass
class PerpNegViews:
    """Per view: the positive prompt as a mix of the directional ones, and two weighted negatives.

    Attributes:
        positive_mix: ``[B, len(VIEW_DIRECTIONS)]`` interpolation weights (rows sum to 1).
        negative_index: ``[B, 2]`` index into :data:`VIEW_DIRECTIONS` of each negative prompt.
        negative_weights: ``[B, 2]`` (≤ 0 with the default functions; 0 for overhead views).
    """

    positive_mix: torch.Tensor
    negative_index: torch.Tensor
    negative_weights: torch.Tensor


def perp_neg_views(
    config: PromptConfig, elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor
) -> PerpNegViews:
    """threestudio's Perp-Neg interpolation for a batch of views.

    |azimuth| < 90°: r = 1 − |azimuth|/90, positive r·front + (1 − r)·side, negatives front and side with
    weights −f_fs(r), −f_sf(1 − r). Otherwise r = 2 − |azimuth|/90, positive r·side + (1 − r)·back,
    negatives side and front with weights −f_sb(r), −f_fsb(r). Elevation above ``overhead_threshold``:
    the overhead prompt, negative weights 0.
    """
    side, front, back, overhead = (VIEW_DIRECTIONS.index(d) for d in ("side", "front", "back", "overhead"))
    azimuth = (torch.remainder(azimuth_deg.float() + 180.0, 360.0) - 180.0).abs()
    batch = azimuth.shape[0]
    mix = torch.zeros(batch, len(VIEW_DIRECTIONS), device=azimuth.device)
    rows = torch.arange(batch, device=azimuth.device)
    frontal = azimuth < 90.0
    r = torch.where(frontal, 1.0 - azimuth / 90.0, 2.0 - azimuth / 90.0)
    mix[rows, torch.where(frontal, front, side)] += r
    mix[rows, torch.where(frontal, side, back)] += 1.0 - r
    index = torch.stack(
        [torch.where(frontal, front, side), torch.full_like(rows, side).where(frontal, front)], dim=-1
    )
    weights = -torch.stack(
        [
            torch.where(
                frontal,
                _shifted_exponential(config.perp_neg_f_fs, r),
                _shifted_exponential(config.perp_neg_f_sb, r),
            ),
            torch.where(
                frontal,
                _shifted_exponential(config.perp_neg_f_sf, 1.0 - r),
                _shifted_exponential(config.perp_neg_f_fsb, r),
            ),
        ],
        dim=-1,
    )
    above = elevation_deg.float().to(azimuth.device) > config.overhead_threshold
    mix[above] = 0.0
    mix[above, overhead] = 1.0
    weights[above] = 0.0
    return PerpNegViews(mix, index, weights)


TextEncodeFn = Callable[[list[str]], torch.Tensor]


class TextEncoding(Protocol):
    """A text encoder that is loaded only when some embedding is missing from the cache."""

    cache_key: str

    def load(self) -> TextEncodeFn:
        """Load the tokenizer and encoder; return a function mapping texts to embeddings [N, L, D]."""
        ...


@dataclass
class PretrainedTextEncoding:
    """The tokenizer + text encoder of a diffusers checkpoint (subfolders ``tokenizer``/``text_encoder``).

    ``family`` selects CLIP (Stable Diffusion; last hidden state, padded to the tokenizer's max length)
    or T5 (DeepFloyd IF; 77 tokens with the attention mask).
    """

    name_or_path: str
    family: Literal["clip", "t5"]
    torch_dtype: TorchDType = "auto"
    config_hint: str | None = None
    variant: str | None = None

    @property
    def cache_key(self) -> str:
        return f"{self.family}:{self.name_or_path}"

    def load(self) -> TextEncodeFn:
        import transformers

        device = default_device()
        dtype = resolve_dtype(self.torch_dtype, device)
        if self.family == "clip":
            tokenizer_cls, encoder_cls = transformers.CLIPTokenizer, transformers.CLIPTextModel
        else:
            tokenizer_cls, encoder_cls = transformers.T5Tokenizer, transformers.T5EncoderModel
        tokenizer = load_pretrained(
            tokenizer_cls, self.name_or_path, "tokenizer", config_hint=self.config_hint
        )
        variant = {"variant": self.variant} if self.variant else {}
        encoder = load_pretrained(
            encoder_cls,
            self.name_or_path,
            "text_encoder",
            config_hint=self.config_hint,
            torch_dtype=dtype,
            **variant,
        )
        encoder = encoder.to(device).eval()
        max_length = tokenizer.model_max_length if self.family == "clip" else 77

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            tokens = tokenizer(
                texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).to(device)
            mask = tokens.attention_mask if self.family == "t5" else None
            return encoder(tokens.input_ids, attention_mask=mask)[0].float().cpu()

        return encode


def _cache_file(cache_dir: Path, cache_key: str, text: str) -> Path:
    digest = hashlib.sha256(f"{cache_key}\n{text}".encode()).hexdigest()[:32]
    return cache_dir / f"{digest}.pt"


def write_cached_embedding(cache_dir: Path, cache_key: str, text: str, embedding: torch.Tensor) -> None:
    """Write ``text``'s embedding into the cache (atomically: a reader never sees half a file)."""
    record = {"cache_key": cache_key, "text": text, "embedding": embedding.clone()}
    handle, tmp_name = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(handle)
    torch.save(record, tmp_name)
    os.replace(tmp_name, _cache_file(cache_dir, cache_key, text))


def encoding_batches(items: list, batch_size: int, progress: bool, description: str) -> Iterable[list]:
    """``items`` in batches of ``batch_size``, behind a progress bar when ``progress`` and there is more than one."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm

        return tqdm(batches, desc=description, unit="batch")
    return batches


def cached_text_embeddings(texts: list[str], encoding: TextEncoding, cache_dir: str | Path) -> torch.Tensor:
    """Embeddings [N, L, D] (float32, CPU) of ``texts``; the encoder is loaded only for cache misses
    and released before returning."""
    cache_dir = Path(cache_dir)
    files = [_cache_file(cache_dir, encoding.cache_key, text) for text in texts]
    missing = sorted({text for text, file in zip(texts, files) if not file.exists()})
    if missing:
        encode = encoding.load()
        embeddings = encode(missing)
        del encode
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cache_dir.mkdir(parents=True, exist_ok=True)
        for text, embedding in zip(missing, embeddings):
            write_cached_embedding(cache_dir, encoding.cache_key, text, embedding)
    return torch.stack([torch.load(file, weights_only=True)["embedding"] for file in files])


@dataclass
class PromptEmbeddings:
    """Cached embeddings of one prompt: view-independent, one per view direction, and the negative.

    Attributes:
        view_independent: [1, L, D].
        directional: [len(VIEW_DIRECTIONS), L, D], in the order of :data:`VIEW_DIRECTIONS`.
        negative: [1, L, D].
    """

    config: PromptConfig
    view_independent: torch.Tensor
    directional: torch.Tensor
    negative: torch.Tensor

    @classmethod
    def compute(cls, config: PromptConfig, encoding: TextEncoding) -> PromptEmbeddings:
        """Embed (or read from the cache) everything ``config`` needs."""
        texts = [config.prompt, config.negative_prompt, *config.directional_prompts()]
        embeddings = cached_text_embeddings(texts, encoding, config.cache_dir)
        return cls(config, embeddings[0:1], embeddings[2:], embeddings[1:2])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        """A copy on ``device`` (and ``dtype`` when given)."""
        move = lambda x: x.to(device=device, dtype=dtype or x.dtype)  # noqa: E731
        return PromptEmbeddings(
            self.config, move(self.view_independent), move(self.directional), move(self.negative)
        )

    def direction_index(self, elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor) -> torch.Tensor:
        """Index into :data:`VIEW_DIRECTIONS` per view (int64, shape [B])."""
        cfg = self.config
        azimuth = torch.remainder(azimuth_deg.float() + 180.0, 360.0) - 180.0  # wrap to [−180, 180)
        index = torch.zeros_like(azimuth, dtype=torch.long)
        index[azimuth.abs() < cfg.front_threshold] = VIEW_DIRECTIONS.index("front")
        index[azimuth.abs() > 180.0 - cfg.back_threshold] = VIEW_DIRECTIONS.index("back")
        index[elevation_deg.float() > cfg.overhead_threshold] = VIEW_DIRECTIONS.index("overhead")
        return index

    def perp_neg_for_views(self, elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor) -> PerpNegCondition:
        """The Perp-Neg condition of a batch of views: interpolated positive embeddings [B, L, D], two
        negative ones [B, L, D] and their weights [B, 2] (:func:`perp_neg_views`)."""
        views = perp_neg_views(self.config, elevation_deg, azimuth_deg)
        table = self.directional
        mix = views.positive_mix.to(table)
        positive = torch.einsum("bk,kld->bld", mix, table)
        index = views.negative_index.to(table.device)
        negatives = [table[index[:, 0]], table[index[:, 1]]]
        return PerpNegCondition(positive, negatives, views.negative_weights.to(table.device))

    def for_views(
        self, elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor
    ) -> tuple[torch.Tensor | PerpNegCondition, torch.Tensor]:
        """(condition, uncondition) embeddings for a batch of views, each [B, L, D].

        Without view-dependent prompting the condition is the plain prompt for every view; with
        ``perp_neg`` it is a :class:`~recipes.guidance.cfg.PerpNegCondition` (:meth:`perp_neg_for_views`).
        """
        batch = elevation_deg.shape[0]
        if self.config.perp_neg:
            condition = self.perp_neg_for_views(elevation_deg, azimuth_deg)
            return condition, self.negative.expand(batch, -1, -1)
        if self.config.view_dependent:
            index = self.direction_index(elevation_deg, azimuth_deg).to(self.directional.device)
            condition = self.directional[index]
        else:
            condition = self.view_independent.expand(batch, -1, -1)
        return condition, self.negative.expand(batch, -1, -1)
