"""Pulling a model: which files, where they go, fetching them, and the alias that names them.

``plan_pull`` turns ``NAME`` (a catalog entry) or a URL into the files to
fetch: the model and its companions (the ``mtp-`` drafter, the ``mmproj-``
projector), each into ``<models dir>/<alias>/``. ``run_pull`` fetches them
with :func:`assistant.config.download.download` and then records the alias
in the models dir's ``pulled.json`` (:func:`assistant.config.models.register_pulled`),
which is what makes ``assistant ask -m ALIAS`` work afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from backends.base import ModelLoadError

from assistant.config.catalog import CATALOG, catalog_entry
from assistant.config.download import (Downloaded, DownloadError, Progress, Transfer, check_url, download,
                                       hf_token_for, redact, safe_filename, url_filename)
from assistant.config.models import BUILTINS, pulled_file, read_pulled, register_pulled

ROLE_LABELS = {"model": "model", "mtp": "MTP drafter", "mmproj": "media projector"}
# Companions are found beside the model by their prefix, so a companion's file gets it if it lacks it.
_PREFIX = {"mtp": "mtp-", "mmproj": "mmproj-"}
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class PullFile:
    role: str  # "model", "mtp" or "mmproj"
    transfer: Transfer


@dataclass
class PullPlan:
    """What a pull will fetch, and the alias it will record."""

    name: str
    models_dir: Path
    source: str  # the catalog name, or the URL (without credentials or query)
    catalog: str | None
    files: list[PullFile]

    @property
    def directory(self) -> Path:
        return self.models_dir / self.name


@dataclass
class PullResult:
    plan: PullPlan
    fetched: dict[str, Downloaded] = field(default_factory=dict)
    present: list[str] = field(default_factory=list)  # roles already in place (not fetched again)
    failed: dict[str, DownloadError] = field(default_factory=dict)  # companions that failed
    manifest: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def check_alias(name: str) -> str:
    """``name`` if it can name a pulled model (and its folder); DownloadError otherwise."""
    if not _ALIAS.match(name or ""):
        raise DownloadError(f"refusing the alias {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    if name in BUILTINS:
        raise DownloadError(f"the alias {name!r} is a built-in model's; choose another with --name")
    if name.lower().endswith((".gguf", ".bin", ".safetensors", ".json", ".part", ".lock")):
        raise DownloadError(f"the alias {name!r} looks like a file name; choose another with --name")
    return name


def _alias_from_filename(filename: str) -> str:
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    alias = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip(".-_")[:64].rstrip(".-_")
    return alias or "model"


def plan_pull(source: str, *, models_dir: Path, name: str | None = None, sha256: str | None = None,
              mtp: str | None = None, mmproj: str | None = None) -> PullPlan:
    """The files ``source`` (a catalog name or an http(s) URL of a GGUF file) stands for.

    ``sha256`` is the model file's checksum (it replaces the catalog's); ``mtp`` / ``mmproj`` are
    URLs of companions (they replace the catalog's of that role). DownloadError for anything
    that cannot be pulled, naming it."""
    source = (source or "").strip()
    if sha256 is not None:
        sha256 = sha256.strip().lower()
    if "://" in source:
        check_url(source)
        filename = url_filename(source)
        if not filename.lower().endswith(".gguf"):
            raise DownloadError(f"only GGUF model files (*.gguf) can be pulled; {redact(source)} names {filename!r}")
        alias = check_alias(name or _alias_from_filename(filename))
        files = [PullFile("model", _transfer(source, models_dir / alias, filename, "model", sha256, "--sha256"))]
        plan = PullPlan(alias, models_dir, redact(source), None, files)
    else:
        plan = _catalog_plan(source, models_dir, name, sha256)
    for role, url in (("mtp", mtp), ("mmproj", mmproj)):
        if url:
            check_url(url)
            plan.files = [f for f in plan.files if f.role != role]
            plan.files.append(PullFile(role, _transfer(url, plan.directory, url_filename(url), role, None, "")))
    names = [f.transfer.dest.name for f in plan.files]
    if len(set(names)) != len(names):
        raise DownloadError(f"two files of this pull would have the same name: {', '.join(names)}")
    return plan


def _catalog_plan(source: str, models_dir: Path, name: str | None, sha256: str | None) -> PullPlan:
    entry = catalog_entry(source)
    if entry is None:
        raise DownloadError(f"unknown model {source!r}: the catalog has {', '.join(CATALOG)} "
                            "(`assistant models pull` lists them); or give the http(s) URL of a GGUF file")
    alias = check_alias(name or entry.name)
    files = []
    for f in entry.files:
        pin, pin_from = (sha256, "--sha256") if f.role == "model" and sha256 else (f.sha256, "the catalog")
        t = _transfer(f.url, models_dir / alias, f.filename, f.role, pin, pin_from)
        t.size = f.size
        files.append(PullFile(f.role, t))
    return PullPlan(alias, models_dir, entry.name, entry.name, files)


def _transfer(url: str, directory: Path, filename: str, role: str, sha256: str | None, sha_from: str) -> Transfer:
    filename = safe_filename(filename)
    prefix = _PREFIX.get(role)
    if prefix and not filename.lower().startswith(prefix):
        filename = prefix + filename
    if not filename.lower().endswith(".gguf"):
        raise DownloadError(f"only GGUF files (*.gguf) can be pulled, not {filename!r}")
    return Transfer(url=url, dest=directory / filename, sha256=sha256, sha256_from=sha_from,
                    label=ROLE_LABELS[role])


# --------------------------------------------------------------------------
# Running it


def run_pull(plan: PullPlan, *, force: bool = False, progress_for: Callable[[PullFile], Progress | None] | None = None,
             on_file: Callable[[PullFile, str], None] | None = None, retries: int = 3, backoff: float = 1.0,
             timeout: float = 30.0) -> PullResult:
    """Fetch the plan's files (the model first) and record the alias.

    A file already pulled under this alias, still in place with the size and checksum the
    manifest records, is not fetched again unless ``force``. The model's failure raises (the
    alias is not recorded); a companion's is kept in ``PullResult.failed`` and the alias is
    recorded with the companions that arrived. ``on_file(file, what)`` is told "present" or
    "fetching" before each file."""
    previous = _previous_record(plan, force)
    result = PullResult(plan)
    records: dict[str, dict] = {}
    for f in sorted(plan.files, key=lambda f: f.role != "model"):
        old = _still_present(plan, previous, f)
        if old is not None:
            result.present.append(f.role)
            records[f.role] = old
            if on_file:
                on_file(f, "present")
            continue
        if on_file:
            on_file(f, "fetching")
        try:
            got = download(f.transfer, token=hf_token_for(f.transfer.url), retries=retries, backoff=backoff,
                           timeout=timeout, progress=progress_for(f) if progress_for else None)
        except DownloadError as exc:
            if f.role == "model":
                raise
            result.failed[f.role] = exc
            continue
        result.fetched[f.role] = got
        records[f.role] = _file_record(plan, got, f.transfer.url)
    result.manifest = _record(plan, records)
    return result


def _previous_record(plan: PullPlan, force: bool) -> dict:
    """The manifest's record of this alias; refuses to replace one pulled from elsewhere unless ``force``."""
    try:
        old = read_pulled(plan.models_dir).get(plan.name) or {}
    except ModelLoadError as exc:
        raise DownloadError(str(exc)) from None
    where = old.get("catalog") or old.get("source")
    if old and where not in (plan.catalog or plan.source, plan.source) and not force:
        raise DownloadError(f"{plan.name!r} is already pulled, from {where}; choose another alias with --name, "
                            "or pass --force to replace it")
    return {} if force else old


def _still_present(plan: PullPlan, previous: dict, f: PullFile) -> dict | None:
    """The previous record of this file when it is still in place as recorded (else None)."""
    old = previous if f.role == "model" else (previous.get("companions") or {}).get(f.role)
    if not isinstance(old, dict):
        return None
    path = pulled_file(plan.models_dir, old.get("file"))
    if path is None or path != f.transfer.dest or not path.is_file():
        return None
    if path.stat().st_size != old.get("size") or (f.transfer.sha256 and f.transfer.sha256 != old.get("sha256")):
        return None
    return {k: v for k, v in old.items() if k != "companions"}


def _file_record(plan: PullPlan, got: Downloaded, url: str) -> dict:
    return {"file": got.path.relative_to(plan.models_dir).as_posix(), "size": got.size, "sha256": got.sha256,
            "verified": got.verified, "architecture": got.architecture, "source": redact(url)}


def _record(plan: PullPlan, records: dict[str, dict]) -> Path:
    model = dict(records["model"])
    model.update(catalog=plan.catalog, pulled_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 companions={role: r for role, r in records.items() if role != "model"})
    try:
        return register_pulled(plan.models_dir, plan.name, model)
    except (OSError, ModelLoadError) as exc:
        raise DownloadError(f"the files are in {plan.directory}, but recording the alias {plan.name!r} failed: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
