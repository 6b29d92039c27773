"""MLX, imported on first use, and what of it is installed.

Nothing from mlx, mlx-lm or tokenizers is imported until the backend is asked
whether it is available or to load a model, so ``import backends.mlx_backend``
works without them; :func:`import_mlx` names the extra to install when they are
missing.
"""

from __future__ import annotations

import importlib.util

from .base import BackendUnavailable

INSTALL_HINT = "pip install 'local-assistant[mlx]'"


def import_mlx():
    """(mlx.core, mlx.nn), or BackendUnavailable naming the extra to install."""
    try:
        import mlx.core as mx
        import mlx.nn as nn
    except ImportError as exc:
        raise BackendUnavailable(f"MLX is not installed ({exc}); install the extra: {INSTALL_HINT}") from exc
    except (OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"mlx is installed but its native library failed to load: {exc}") from exc
    for module in ("mlx_lm", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailable(f"{module} is not installed; install the extra: {INSTALL_HINT}")
    return mx, nn


def installed_version(dist: str) -> str:
    """The installed version of a distribution, "?" when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def spec_found(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runs_on_gpu(mx) -> bool:
    """Whether MLX computes on a GPU (Metal) here."""
    try:
        return mx.default_device().type == mx.gpu
    except Exception:  # noqa: BLE001
        return False
