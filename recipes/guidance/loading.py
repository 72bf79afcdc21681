"""Loading guidance models through ``from_pretrained`` from a hub id or a local folder.

Every model part goes through :func:`load_pretrained`, which turns "not on disk and not reachable"
(offline mode, no cache, wrong path, gated repo) into :class:`GuidanceModelNotFoundError` naming the
model and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from recipes.guidance.parameterization import PredictionType

TorchDType = Literal["auto", "float32", "float16", "bfloat16"]


class GuidanceModelNotFoundError(OSError):
    """A guidance model (or one of its parts) is neither in a local folder nor in the hub cache."""


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().is_absolute() or name_or_path.startswith((".", "~"))


def _cause(name_or_path: str, part: str | None, error: BaseException | None) -> str:
    """Why the model could not be loaded, in a few words."""
    if _is_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            return f"the local folder {name_or_path} does not exist"
        if part and not (folder / part).is_dir():
            return f"the local folder {name_or_path} has no '{part}' subfolder"
        return f"the local folder {name_or_path} is not a complete diffusers checkpoint"
    chain, seen = [], error
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    if _offline():
        return "it is not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloading it"
    if "GatedRepoError" in names:
        return "the repository is gated: accept its license on the hub and run `hf auth login`"
    if names & {
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
        "ConnectError",
        "OfflineModeIsEnabled",
    } or any("connect" in str(e).lower() for e in chain):
        return "it is not in the local hub cache and the hub cannot be reached (no network)"
    if "RepositoryNotFoundError" in names:
        return "no such repository on the hub (or it is private: run `hf auth login`)"
    return "it is neither in the local hub cache nor downloadable"


def missing_model_message(
    name_or_path: str,
    part: str | None = None,
    config_hint: str | None = None,
    error: BaseException | None = None,
) -> str:
    """One line: which model (and part) is missing, why, and the two ways to fix it (download it
    once, or point the config at a local folder)."""
    what = f"'{name_or_path}'" + (f" (part '{part}')" if part else "")
    setting = f"{config_hint}=/path/to/folder" if config_hint else "the model path to a local folder"
    if _is_local(name_or_path):
        fix = "Fix the path, or fill a folder with `hf download <hub id> --local-dir /path/to/folder`"
    else:
        fix = f"Run `hf download {name_or_path}` once where there is network"
    return (
        f"Guidance model {what} is not available: {_cause(name_or_path, part, error)}. "
        f"{fix}, or set {setting} (a folder in the diffusers layout)."
    )


def resolve_dtype(requested: TorchDType, device: torch.device | str) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 elsewhere; explicit names are honoured."""
    if requested == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def default_device() -> torch.device:
    """The current CUDA device when there is one (the rank's device under DDP), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_pretrained(
    cls: Any,
    name_or_path: str,
    subfolder: str | None = None,
    *,
    config_hint: str | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(name_or_path, subfolder=…, **kwargs)`` with a clear error when missing.

    Tokenizers are checked too: transformers returns an empty tokenizer for a missing repo in
    offline mode instead of failing.
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    from huggingface_hub.errors import HFValidationError

    try:
        loaded = cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, HFValidationError) as error:
        raise GuidanceModelNotFoundError(
            missing_model_message(name_or_path, subfolder, config_hint, error)
        ) from error
    special_tokens = getattr(loaded, "all_special_tokens", None)
    if special_tokens is not None and len(loaded) <= len(special_tokens):
        raise GuidanceModelNotFoundError(missing_model_message(name_or_path, subfolder, config_hint))
    return loaded


def load_noise_schedule(name_or_path: str, config_hint: str) -> tuple[torch.Tensor, int, PredictionType]:
    """ᾱ_t, the number of training timesteps and the prediction type from the ``scheduler`` subfolder."""
    from diffusers import DDPMScheduler

    scheduler = load_pretrained(DDPMScheduler, name_or_path, "scheduler", config_hint=config_hint)
    return (
        scheduler.alphas_cumprod.to(torch.float32),
        int(scheduler.config.num_train_timesteps),
        scheduler.config.prediction_type,
    )
