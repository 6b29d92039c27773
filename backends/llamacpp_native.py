"""llama-cpp-python, imported on first use, and what llama.cpp logs.

:func:`llama` imports ``llama_cpp`` (which loads the shared library and pulls
in jinja2, numpy and friends) the first time a backend asks whether it is
available or loads a model, so ``import backends.llamacpp`` works even where
llama-cpp-python is missing.

llama.cpp's log is kept off stderr: its warnings and errors are remembered in
:data:`LOG_TAIL` so that a failed load or decode can say what llama.cpp said
(:func:`llama_said`, :func:`explain_load_failure`), and every line goes to
the ``backends.llamacpp`` logger at DEBUG (so ``-v`` shows it).
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

from .base import BackendUnavailable

# The backend's logger: llama.cpp's lines appear under the backend's name.
log = logging.getLogger("backends.llamacpp")

_C: Any = None  # the llama_cpp.llama_cpp module, once imported
_M: Any = None  # the llama_cpp.mtmd_cpp module (libmtmd), once imported
_LOG_CALLBACK: Any = None  # keeps the ctypes callback alive
LOG_TAIL: collections.deque[str] = collections.deque(maxlen=30)
_last_level = 0

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5


def _on_llama_log(level: int, text: bytes, _user_data: Any) -> None:
    """llama.cpp's log callback: warnings and errors are remembered (a CONT
    line continues the previous one); everything goes to our logger at DEBUG."""
    global _last_level
    if level == _GGML_CONT:
        level = _last_level
    else:
        _last_level = level
    if level >= _GGML_WARN:
        msg = text.decode("utf-8", "replace") if text else ""
        if LOG_TAIL and level == _last_level and LOG_TAIL[-1] and not LOG_TAIL[-1].endswith("\n"):
            LOG_TAIL[-1] += msg
        else:
            LOG_TAIL.append(msg)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("llama.cpp: %s", msg.rstrip())
    elif log.isEnabledFor(logging.DEBUG) and text:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def llama():
    """The ``llama_cpp.llama_cpp`` module: imported, its log captured and the
    llama.cpp backend initialised on the first call; ``BackendUnavailable``
    saying why when llama-cpp-python is missing or its library fails to load."""
    global _C, _LOG_CALLBACK
    if _C is not None:
        return _C
    try:
        import llama_cpp  # noqa: F401  (package import loads the shared library)
        import llama_cpp.llama_cpp as C
    except ImportError as exc:
        raise BackendUnavailable(
            f"llama-cpp-python is not installed ({exc}); install it with: pip install llama-cpp-python"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"llama-cpp-python is installed but its native library failed to load: {exc}") from exc
    _LOG_CALLBACK = C.llama_log_callback(_on_llama_log)
    C.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    C.llama_backend_init()
    _C = C
    return C


def mtmd():
    """The ``llama_cpp.mtmd_cpp`` module (libmtmd: images and audio through a
    projector), imported on first use with its log (and its helpers') routed
    to ours, so a refused image says what libmtmd said and nothing reaches
    stderr; ``BackendUnavailable`` when this llama-cpp-python has no libmtmd."""
    global _M
    if _M is not None:
        return _M
    llama()  # the log callback exists and the backend is initialised
    try:
        import llama_cpp.mtmd_cpp as M
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"this llama-cpp-python has no libmtmd (images and audio): {exc}") from exc
    for name in ("mtmd_log_set", "mtmd_helper_log_set"):
        setter = getattr(M, name, None)
        if setter is not None:
            setter(_LOG_CALLBACK, ctypes.c_void_p(0))
    _M = M
    return M


def library_availability() -> tuple[bool, str]:
    """Whether llama-cpp-python is installed and loads: (True, "llama-cpp-python
    VERSION (CPU only|with GPU offload)"), or (False, why not)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False, "llama-cpp-python is not installed (pip install llama-cpp-python)"
    try:
        C = llama()
    except BackendUnavailable as exc:
        return False, str(exc)
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("llama-cpp-python")
    except PackageNotFoundError:
        ver = "unknown version"
    gpu = "with GPU offload" if C.llama_supports_gpu_offload() else "CPU only"
    return True, f"llama-cpp-python {ver} ({gpu})"


def logits_ith(C):
    """A private handle on ``llama_get_logits_ith`` that returns a plain address
    (the binding's returns a ctypes POINTER object, slower to turn into numpy)."""
    fn = C._lib["llama_get_logits_ith"]
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    fn.restype = ctypes.c_void_p
    return fn


def llama_said() -> str:
    """The warnings/errors llama.cpp logged since the last ``LOG_TAIL.clear()``."""
    lines = [ln.strip() for ln in LOG_TAIL if ln.strip()]
    return "; ".join(lines[-4:])


_LOG_PREFIX = re.compile(r"^(?:[a-z_0-9]+: )+(?:error loading model: )?(?:[a-z_0-9]+: )?")


def explain_load_failure(path: Path) -> str:
    """Turn what llama.cpp logged about a failed load into one clear sentence."""
    details = []
    for line in LOG_TAIL:
        text = _LOG_PREFIX.sub("", line.strip())
        if text and "failed to load model" not in text and text not in details:
            details.append(text)
    detail = "; ".join(details[:2]) or "no reason given"
    low = " ".join(details).lower()
    if "not within the file bounds" in low or "incomplete" in low:
        return f"{path} is truncated or corrupt ({detail}); download or assemble it again"
    if "failed to read" in low or "gguf_init" in low or "header" in low or "must be in" in low:
        return f"{path} is not a valid GGUF file: its header is damaged or cut short ({detail})"
    if "unknown model architecture" in low:
        return f"{path} uses a model architecture this llama.cpp does not support ({detail}); upgrade llama-cpp-python"
    return f"llama.cpp could not load {path}: {detail}"
