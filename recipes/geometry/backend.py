"""Choosing between the pure-torch reference path and an optional CUDA library, logged once per choice."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Literal

logger = logging.getLogger("recipes")

Backend = Literal["torch", "tcnn"]

_PACKAGES = {
    "tcnn": (
        "tinycudann",
        "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
    ),
    "nerfacc": ("nerfacc", "pip install nerfacc"),
}
_logged: set[tuple[str, str]] = set()


def import_backend(backend: str) -> ModuleType | None:
    """Import the library behind ``backend`` (``None`` for ``"torch"``), raising a clear error if it is missing."""
    if backend == "torch":
        return None
    if backend not in _PACKAGES:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of 'torch', {', '.join(map(repr, _PACKAGES))}"
        )
    package, install = _PACKAGES[backend]
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"backend {backend!r} needs the {package!r} package, which is not importable ({error}). "
            f"Install it on a CUDA machine with `{install}`, or set backend: torch."
        ) from error


def log_backend_once(component: str, backend: str) -> None:
    """Log (at INFO, once per process) which backend ``component`` uses."""
    if (component, backend) not in _logged:
        _logged.add((component, backend))
        logger.info("%s backend: %s", component, backend)
