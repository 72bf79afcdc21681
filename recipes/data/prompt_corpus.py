"""A prompt corpus for amortized text-to-3D: its train/val/test prompts, read once, checked, and drawn per step.

Two file formats (docs/recipes/amortized.md):

- a JSON prompt library, ScaleDreamer's format: one object with the lists ``"train"``, ``"val"`` and ``"test"``
  (``load/magic3d_15_prompt_library.json`` and the like);
- a plain text file, one prompt a line (blank lines skipped, surrounding spaces stripped); then the one list is
  all three splits, as in ScaleDreamer's MG15 library, whose three lists are identical.

Bad input fails at once, in one line that says what was wrong and what to do (:class:`PromptCorpusError`): a
file that cannot be read, invalid JSON, a missing or non-list split, a prompt that is not a string or is empty,
an empty split, a prompt that appears twice in a split (with both positions). Prompts longer than the text
encoder takes are truncated by it, with one warning per corpus (:func:`warn_long_prompts`).

Each step's prompts are a pure function of the step seed (:func:`draw_prompts` on
:func:`lightning_picard.step_generator`), so any rank can evaluate any step and every rank of a slot group draws
the same batch before taking its part.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")


class PromptCorpusError(ValueError):
    """A prompt corpus that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class PromptCorpus:
    """The prompts of an amortized run, per split.

    Attributes:
        train: the prompts each step draws from.
        val: the prompts rendered at validation.
        test: the prompts whose turntables ``test`` writes (and ``lightning-picard eval`` scores).
        source: where they came from (a path, or a description), for messages.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    source: str = "<corpus>"

    def __post_init__(self) -> None:
        for split in SPLITS:
            check_split(getattr(self, split), split, self.source)

    def split(self, name: str) -> tuple[str, ...]:
        """The prompts of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use 'train', 'val' or 'test'")
        return getattr(self, name)

    def all_prompts(self) -> list[str]:
        """Every distinct prompt of the three splits, in first-seen order (train, then val, then test)."""
        return list(dict.fromkeys([*self.train, *self.val, *self.test]))

    @classmethod
    def from_prompts(cls, prompts: list[str] | tuple[str, ...], source: str = "<prompts>") -> PromptCorpus:
        """One list of prompts as all three splits."""
        prompts = tuple(prompts)
        return cls(prompts, prompts, prompts, source)


def check_split(prompts: tuple[str, ...], split: str, source: str, lines: list[int] | None = None) -> None:
    """Raise :class:`PromptCorpusError` if ``prompts`` is empty, holds a non-string or blank prompt, or repeats one.

    ``lines`` are the prompts' line numbers in a text file (positions are then given as lines, else as indices).
    """

    def where(i: int) -> str:
        return f"line {lines[i]}" if lines is not None else f"{split}[{i}]"

    if len(prompts) == 0:
        raise PromptCorpusError(f"{source}: the {split!r} split is empty; give it at least one prompt")
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptCorpusError(
                f"{source}: {where(i)} is a {type(prompt).__name__}, not a prompt; every entry must be a string"
            )
        if not prompt.strip():
            raise PromptCorpusError(f"{source}: {where(i)} is an empty prompt; remove it or write the prompt")
        if prompt in seen:
            raise PromptCorpusError(
                f"{source}: {where(i)} {prompt!r} repeats {where(seen[prompt])}; remove the duplicate "
                "(each prompt once per split, or it is drawn more often than the others)"
            )
        seen[prompt] = i


def load_prompt_corpus(path: str | Path) -> PromptCorpus:
    """The corpus of a JSON prompt library (``.json``) or a text file, one prompt a line (any other suffix).

    Raises:
        PromptCorpusError: the file is missing or unreadable, or its content is not a valid corpus.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PromptCorpusError(
            f"prompt corpus {path} cannot be read ({reason}); pass an existing UTF-8 JSON prompt library or text "
            "file (one prompt a line) as model.corpus.path"
        ) from None
    if path.suffix.lower() == ".json":
        return _parse_library(text, str(path))
    return _parse_lines(text, str(path))


def _parse_library(text: str, source: str) -> PromptCorpus:
    try:
        library = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptCorpusError(
            f"{source} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); fix it, or give "
            "a .txt file with one prompt a line"
        ) from None
    expected = '{"train": [...], "val": [...], "test": [...]}'
    if not isinstance(library, dict):
        raise PromptCorpusError(
            f"{source} holds a JSON {type(library).__name__}; a prompt library is {expected}"
        )
    missing = [split for split in SPLITS if split not in library]
    if missing:
        raise PromptCorpusError(
            f"{source} has no {', '.join(map(repr, missing))} list; a prompt library is {expected}"
        )
    for split in SPLITS:
        if not isinstance(library[split], list):
            raise PromptCorpusError(
                f"{source}: {split!r} is a {type(library[split]).__name__}, not a list of prompts; "
                f"a prompt library is {expected}"
            )
    return PromptCorpus(*(tuple(library[split]) for split in SPLITS), source=source)


def _parse_lines(text: str, source: str) -> PromptCorpus:
    prompts, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append(line.strip())
            lines.append(number)
    check_split(tuple(prompts), "train", f"{source} (text file: one list for train, val and test)", lines)
    return PromptCorpus.from_prompts(prompts, source)


def draw_prompts(num_prompts: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices ``[batch_size]`` into the train prompts for one step, from ``generator`` alone.

    Distinct prompts (a random subset, ScaleDreamer's ``random.sample``) when the corpus has at least
    ``batch_size`` of them, else draws with replacement (its ``random.choices``).
    """
    if batch_size < 1:
        raise ValueError(f"prompts per step must be at least 1, got {batch_size}")
    if batch_size <= num_prompts:
        return torch.randperm(num_prompts, generator=generator)[:batch_size]
    return torch.randint(0, num_prompts, (batch_size,), generator=generator)


def warn_long_prompts(prompts: list[str], lengths: list[int], max_tokens: int, encoder: str) -> list[int]:
    """Warn once (one line) if some prompts have more than ``max_tokens`` tokens; return their indices.

    The text encoders truncate such prompts to their first ``max_tokens`` tokens, keeping the end-of-text token
    (unlike ScaleDreamer's slicing, which drops it). We truncate rather than refuse because the published corpora
    hold such prompts (DL17k's longest is 523 characters) and refusing would make them unusable without editing.
    """
    long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if long:
        first = long[0]
        warnings.warn(
            f"{len(long)} prompt(s) are longer than the {max_tokens} tokens {encoder} takes and are truncated to "
            f"their first {max_tokens} tokens, e.g. {prompts[first][:60]!r}… ({lengths[first]} tokens); shorten "
            "them in the corpus file to control what is kept",
            stacklevel=2,
        )
    return long


__all__ = [
    "SPLITS",
    "PromptCorpus",
    "PromptCorpusError",
    "check_split",
    "draw_prompts",
    "load_prompt_corpus",
    "warn_long_prompts",
]
