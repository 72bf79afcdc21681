"""Choosing between the pure-torch reference path and an optional CUDA library, logged once per choice.

Every CUDA-only backend (tiny-cuda-nn, nerfacc, nvdiffrast, gsplat) goes through :func:`require_cuda`,
so asking for one where there is no CUDA fails at once with one line naming the component, the
backend and the setting to use instead (:class:`BackendNeedsCUDAError`).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Literal

import torch

logger = logging.getLogger("recipes")

Backend = Literal["torch", "tcnn"]

_PACKAGES = {
    "tcnn": (
        "tinycudann",
        "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
    ),
    "nerfacc": ("nerfacc", "pip install nerfacc"),
}
CUDA_BACKENDS = {
    "tcnn": "tiny-cuda-nn",
    "nerfacc": "nerfacc",
    "nvdiffrast": "nvdiffrast",
    "gsplat": "gsplat",
}
"""Backends that run on CUDA only, with the library behind each."""
_logged: set[tuple[str, str]] = set()


class BackendNeedsCUDAError(RuntimeError):
    """A CUDA-only backend was chosen on a machine without CUDA, or for tensors that are not on a GPU."""


def require_cuda(
    component: str, backend: str, device: torch.device | None = None, alternative: str = "backend: torch"
) -> None:
    """Raise :class:`BackendNeedsCUDAError` unless ``backend`` can run: CUDA is available and, when
    ``device`` is given, the tensors are on a CUDA device. ``alternative`` is the setting to suggest
    (default is ``"backend: torch"``, the pure-torch path that runs anywhere)."""
    if device is None:
        if torch.cuda.is_available():
            return
        reason = "this machine has no CUDA device (torch.cuda.is_available() is False)"
    else:
        if torch.device(device).type == "cuda":
            return
        reason = f"its inputs are on {torch.device(device)}"
    library = CUDA_BACKENDS.get(backend, backend)
    raise BackendNeedsCUDAError(
        f"{component} backend {backend!r} ({library}) needs CUDA, but {reason}; "
        f"set {alternative} (pure torch, runs anywhere) or run on a CUDA device"
    )


def import_backend(backend: str, component: str = "this component") -> ModuleType | None:
    """Import the library behind ``backend`` (``None`` for ``"torch"``), raising a clear error if CUDA
    is missing (:func:`require_cuda`) or the library is."""
    if backend == "torch":
        return None
    if backend not in _PACKAGES:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of 'torch', {', '.join(map(repr, _PACKAGES))}"
        )
    require_cuda(component, backend)
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
