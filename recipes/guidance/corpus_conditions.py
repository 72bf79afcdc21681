"""The guidance's condition for each prompt of a corpus: text embeddings, or the object of the weight-free prior.

The amortized system renders one prompt at a time and asks :meth:`CorpusConditions.conditions` for the
(condition, uncondition) pair of CFG for that prompt's views:

- :class:`TextConditions` (Stable Diffusion, DeepFloyd IF): the prompt's view-dependent embeddings
  (:class:`~recipes.guidance.prompts.PromptEmbeddings`: view suffixes, Perp-Neg, negative prompt), all written to
  the embedding cache once for the whole corpus (:func:`fill_text_cache`, progress bar for long work) and read
  back per prompt when it is drawn (a small in-memory LRU keeps the recent ones);
- :class:`ObjectConditions` (the closed-form prior of K procedural objects): "object k from these cameras"
  (:class:`~recipes.guidance.multi_object.ObjectViews`), uncondition None (the mixture of all objects).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from recipes.data.cameras import Cameras
from recipes.guidance.multi_object import object_views
from recipes.guidance.prompts import (
    PromptConfig,
    PromptEmbeddings,
    TextEncoding,
    _cache_file,
    encoding_batches,
    write_cached_embedding,
)


class CorpusConditions(Protocol):
    """CFG conditions per prompt of a corpus."""

    def conditions(self, prompt: str, index: int, cameras: Cameras) -> tuple[Any, Any]:
        """(condition, uncondition) of prompt ``prompt`` (train index ``index``) seen from ``cameras``."""
        ...

    def view_independent(self, prompt: str) -> Tensor | None:
        """The prompt's view-independent text embedding ``[1, L, D]`` (VSD's LoRA condition), or None."""
        ...


class ObjectConditions:
    """The weight-free prior's conditions: train prompt ``index`` is procedural object ``index``."""

    def conditions(self, prompt: str, index: int, cameras: Cameras) -> tuple[Any, Any]:
        return object_views(torch.full((len(cameras),), index, dtype=torch.long), cameras), None

    def view_independent(self, prompt: str) -> Tensor | None:
        return None


def fill_text_cache(
    texts: list[str],
    encoding: TextEncoding,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> int:
    """Write the embeddings of every text of ``texts`` not yet in ``cache_dir``; return how many were computed.

    The encoder is loaded once, only if something is missing, and runs in batches of ``batch_size`` texts (a
    progress bar when there is more than one batch). Files are the layout of :mod:`recipes.guidance.prompts`.
    """
    cache_dir = Path(cache_dir)
    missing = list(
        dict.fromkeys(t for t in texts if not _cache_file(cache_dir, encoding.cache_key, t).exists())
    )
    if not missing:
        return 0
    encode = encoding.load()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for batch in encoding_batches(missing, batch_size, progress, "prompt embeddings"):
        for text, embedding in zip(batch, encode(batch)):
            write_cached_embedding(cache_dir, encoding.cache_key, text, embedding)
    del encode
    return len(missing)


class TextConditions:
    """A text model's conditions for every prompt of a corpus.

    Args:
        prompts: the corpus's distinct prompts (every split).
        options: view-dependent prompting, negative prompt and cache folder (its ``prompt`` is replaced per prompt).
        encoding: the guidance model's text encoder (``denoiser.text_encoding()``).
        device, dtype: where the embeddings go.
        keep: how many prompts' embeddings stay in memory. Default is 256.
    """

    def __init__(
        self,
        prompts: list[str],
        options: PromptConfig,
        encoding: TextEncoding,
        device: torch.device,
        dtype: torch.dtype,
        keep: int = 256,
    ) -> None:
        self.options, self.encoding = options, encoding
        self.device, self.dtype, self.keep = device, dtype, keep
        texts = [options.negative_prompt]
        for prompt in prompts:
            config = replace(options, prompt=prompt)
            texts += [config.prompt, *config.directional_prompts()]
        fill_text_cache(texts, encoding, options.cache_dir)
        self._recent: OrderedDict[str, PromptEmbeddings] = OrderedDict()

    def embeddings(self, prompt: str) -> PromptEmbeddings:
        """The cached embeddings of ``prompt`` (read from the cache folder on first use)."""
        if prompt in self._recent:
            self._recent.move_to_end(prompt)
            return self._recent[prompt]
        embeddings = PromptEmbeddings.compute(replace(self.options, prompt=prompt), self.encoding)
        embeddings = embeddings.to(self.device, self.dtype)
        self._recent[prompt] = embeddings
        if len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return embeddings

    def conditions(self, prompt: str, index: int, cameras: Cameras) -> tuple[Any, Any]:
        return self.embeddings(prompt).for_views(cameras.elevation_deg, cameras.azimuth_deg)

    def view_independent(self, prompt: str) -> Tensor | None:
        return self.embeddings(prompt).view_independent


__all__ = ["CorpusConditions", "ObjectConditions", "TextConditions", "fill_text_cache"]
