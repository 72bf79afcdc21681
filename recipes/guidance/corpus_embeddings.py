"""The pooled text embeddings an amortized generator is conditioned on: computed once per corpus, cached on disk.

ScaleDreamer conditions its generators on the 1024-d *pooled* CLIP embedding of each prompt (SD 2.1's text
encoder, ``pooler_output``). :func:`corpus_embeddings` returns those of a whole corpus: it reads every prompt
already in the cache folder, loads the encoder only if some are missing, computes those in batches (with a
progress bar when there is more than one batch) and writes each to its own file, atomically, so several ranks may
fill one cache at once. The cache key is the encoder's identity plus the exact prompt
(``sha256(cache_key + "\\n" + prompt)``, the layout of :mod:`recipes.guidance.prompts`).

Two encoders:

- :class:`PooledCLIPEncoder`: a diffusers checkpoint's CLIP tokenizer + text encoder (``pooler_output``); prompts
  over its 77 tokens are truncated (end-of-text token kept) with a warning.
- :class:`CaptionHashEncoder`: weight-free, for the procedural objects of tests, demo and benchmarks. A caption's
  embedding is a fixed Gaussian vector seeded by a hash of its (whitespace-normalised, first ``max_tokens`` words)
  text: distinct captions get independent codes, the same caption always the same one. It carries no meaning, so a
  generator can learn the captions it is trained on but cannot generalise to new ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from recipes.data.prompt_corpus import warn_long_prompts
from recipes.guidance.loading import TorchDType, default_device, load_pretrained, resolve_dtype
from recipes.guidance.prompts import DEFAULT_CACHE_DIR, _cache_file, encoding_batches, write_cached_embedding

PooledEncodeFn = Callable[[list[str]], Tensor]


class PooledTextEncoder(Protocol):
    """A text encoder whose pooled embedding conditions a generator; loaded only on cache misses.

    Attributes:
        cache_key: identifies the encoder (and its settings) in the cache.
        embedding_dim: ``D``, the size of one embedding.
        max_tokens: the longest prompt it takes, in its tokens.
    """

    cache_key: str
    embedding_dim: int
    max_tokens: int

    def token_counts(self, prompts: list[str]) -> list[int]:
        """How many tokens each prompt has (before truncation)."""
        ...

    def load(self) -> PooledEncodeFn:
        """Load the encoder; return a function mapping prompts to embeddings ``[N, D]``."""
        ...


@dataclass
class CaptionHashEncoder:
    """The weight-free encoder: a hash-seeded standard Gaussian vector per caption (see the module docstring).

    Attributes:
        embedding_dim: ``D``. Default is 32.
        max_tokens: words kept (longer captions are truncated with a warning). Default is 77, CLIP's length.
    """

    embedding_dim: int = 32
    max_tokens: int = 77

    @property
    def cache_key(self) -> str:
        return f"caption-hash-v1:{self.embedding_dim}:{self.max_tokens}"

    def token_counts(self, prompts: list[str]) -> list[int]:
        return [len(prompt.split()) for prompt in prompts]

    def embed(self, prompt: str) -> Tensor:
        """The embedding ``[D]`` of one caption (float32)."""
        text = " ".join(prompt.split()[: self.max_tokens])
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63
        return torch.randn(self.embedding_dim, generator=torch.Generator().manual_seed(seed))

    def load(self) -> PooledEncodeFn:
        return lambda prompts: torch.stack([self.embed(p) for p in prompts])


@dataclass
class PooledCLIPEncoder:
    """The CLIP text encoder of a diffusers checkpoint (``tokenizer``/``text_encoder`` subfolders), pooled output.

    Attributes:
        pretrained_model_name_or_path: hub id or local folder. Default is SD 2.1 base (ScaleDreamer's).
        torch_dtype: ``"auto"`` is float16 on GPU and float32 on CPU. Default is ``"auto"``.
        embedding_dim: the encoder's hidden size (1024 for SD 2.x, 768 for SD 1.x). Default is 1024.
        max_tokens: the tokenizer's length. Default is 77.
    """

    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
    torch_dtype: TorchDType = "auto"
    embedding_dim: int = 1024
    max_tokens: int = 77

    @property
    def cache_key(self) -> str:
        return f"clip-pooled:{self.pretrained_model_name_or_path}"

    def _tokenizer(self):
        import transformers

        return load_pretrained(transformers.CLIPTokenizer, self.pretrained_model_name_or_path, "tokenizer")

    def token_counts(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self._tokenizer()(prompts).input_ids]

    def load(self) -> PooledEncodeFn:
        import transformers

        device = default_device()
        dtype = resolve_dtype(self.torch_dtype, device)
        tokenizer = self._tokenizer()
        encoder = load_pretrained(
            transformers.CLIPTextModel, self.pretrained_model_name_or_path, "text_encoder", torch_dtype=dtype
        )
        encoder = encoder.to(device).eval()
        if encoder.config.hidden_size != self.embedding_dim:
            raise ValueError(
                f"{self.pretrained_model_name_or_path}'s text encoder gives {encoder.config.hidden_size}-d embeddings "
                f"but embedding_dim is {self.embedding_dim}; set the text encoder's and the generator's embedding_dim "
                f"to {encoder.config.hidden_size}"
            )

        @torch.no_grad()
        def encode(prompts: list[str]) -> Tensor:
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_tokens,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            return encoder(tokens.input_ids).pooler_output.float().cpu()

        return encode


@dataclass
class CachedEmbeddings:
    """A corpus's embeddings ``[N, D]`` (float32, CPU), in the order of the prompts, and how many were computed
    (not read from the cache) by this call."""

    embeddings: Tensor
    computed: int


def corpus_embeddings(
    prompts: list[str],
    encoder: PooledTextEncoder,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    progress: bool = True,
) -> CachedEmbeddings:
    """The pooled embeddings of ``prompts``: cached ones read, the rest computed in batches and cached.

    Args:
        prompts: the texts (distinct).
        encoder: the text encoder; loaded only if some prompt is not in the cache.
        cache_dir: the cache folder (created on demand). Default is ``.lightning_picard_cache/text_embeddings``.
        batch_size: prompts per encoder call. Default is 64.
        progress: a progress bar when more than one batch is computed. Default is True.
    """
    cache_dir = Path(cache_dir)
    key = f"pooled:{encoder.cache_key}"
    files = [_cache_file(cache_dir, key, prompt) for prompt in prompts]
    missing = [i for i, file in enumerate(files) if not file.exists()]
    if missing:
        warn_long_prompts(
            [prompts[i] for i in missing],
            encoder.token_counts([prompts[i] for i in missing]),
            encoder.max_tokens,
            f"the text encoder {encoder.cache_key!r}",
        )
        encode = encoder.load()
        cache_dir.mkdir(parents=True, exist_ok=True)
        for batch in encoding_batches(missing, batch_size, progress, "text embeddings"):
            embeddings = encode([prompts[i] for i in batch])
            for i, embedding in zip(batch, embeddings):
                write_cached_embedding(cache_dir, key, prompts[i], embedding)
        del encode
    embeddings = torch.stack([torch.load(file, weights_only=True)["embedding"] for file in files])
    if embeddings.shape[-1] != encoder.embedding_dim:
        raise ValueError(
            f"the cached embeddings in {cache_dir} are {embeddings.shape[-1]}-d, but the encoder's embedding_dim is "
            f"{encoder.embedding_dim}; set embedding_dim to the encoder's size"
        )
    return CachedEmbeddings(embeddings.float(), len(missing))


__all__ = [
    "CachedEmbeddings",
    "CaptionHashEncoder",
    "PooledCLIPEncoder",
    "PooledTextEncoder",
    "corpus_embeddings",
]
