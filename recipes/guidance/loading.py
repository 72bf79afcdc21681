"""Loading guidance models through ``from_pretrained`` from a hub id or a local folder.

Every model part goes through :func:`load_pretrained`, which turns "not on disk and not reachable"
(offline mode, no cache, wrong path, gated repo) into :class:`GuidanceModelNotFoundError` naming the
model and how to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from recipes.guidance.parameterization import PredictionType

TorchDType = Literal["auto", "float32", "float16", "bfloat16"]


class GuidanceModelNotFoundError(OSError):
    """A guidance model (or one of its parts) is neither in a local folder nor in the hub cache."""


def missing_model_message(name_or_path: str, part: str | None = None, config_hint: str | None = None) -> str:
    """The user-facing explanation of how to make ``name_or_path`` available."""
    what = f"'{name_or_path}'" + (f" (part '{part}')" if part else "")
    lines = [f"Guidance model {what} is not available on this machine."]
    if Path(name_or_path).expanduser().is_absolute() or name_or_path.startswith("."):
        lines.append(f"The local folder {name_or_path} does not exist or lacks this part.")
    lines += [
        f"Download it once with:  hf download {name_or_path}",
        f"                    or:  huggingface-cli download {name_or_path}",
        "(gated models such as DeepFloyd IF need `hf auth login` and accepting the license on the hub;",
        " with HF_HUB_OFFLINE=1 only the local cache is searched.)",
        "Or point the config at a local folder in the diffusers layout"
        + (f": {config_hint}=/path/to/folder" if config_hint else "")
        + ".",
    ]
    return "\n".join(lines)


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
            missing_model_message(name_or_path, subfolder, config_hint)
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
