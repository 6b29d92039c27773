"""Draft models for speculative decoding, loaded through the model registry,
and which separate MTP drafter (Gemma 4's ``mtp-*.gguf``) a model loads with.

A draft model belongs to its target: the same backend class, context and
threads, loaded once, kept in the target's ``companions`` and driven on the
target's thread (the speculative engine calls both from one job). It is
resolved and its file checked like any model, and its load is a
``model.loaded`` event with ``draft_for`` set.

An MTP drafter model is not a companion: the backend loads it with the target
(``LoadOptions.mtp_model``) and pairs the two. :func:`mtp_model_for` says
which one, before anything is loaded or unloaded: the configured
``speculative.mtp_model`` (the alias's, else the top level's; a relative path
is the config file's folder's), refused when it does not pair (a GGUF
target's header, an MLX folder's config.json), is missing or truncated; else an ``mtp-*.gguf`` beside a
GGUF model file that pairs with it (one that does not is logged and
ignored). Only where the alias's drafter can use it (``mtp`` or ``auto``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from backends.base import Backend, BackendError, LoadOptions, ModelLoadError

from assistant.config import Config
from assistant.daemon.worker import ModelWorker
from assistant.machine.hardware import figures
from assistant.protocol import ErrorCode, RPCError

if TYPE_CHECKING:
    from assistant.config.models import ModelSpec
    from assistant.daemon.registry import ModelRegistry

log = logging.getLogger("assistant.daemon")

MTP_DRAFTERS = ("mtp", "auto")  # the drafters that use a separate MTP drafter model


async def load_draft(registry: ModelRegistry, worker: ModelWorker, name: str) -> Backend:
    """The draft model ``name`` for ``worker``'s model: the same backend class,
    context and threads, loaded once and driven on the target's thread (the
    speculative engine calls both from one job). MODEL_LOAD_FAILED says why not."""
    try:
        spec = await registry.resolve(name, worker.backend.name)
    except RPCError as exc:
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"draft model {name!r}: {exc.message}",
                       {"draft_model": name}) from None
    key = str(spec.path)
    have = worker.companions.get(key)
    if have is not None:
        return have
    info = worker.backend.info
    instance = type(worker.backend)()
    options = LoadOptions(n_ctx=info.context_length, n_threads=info.n_threads, chat_template=spec.chat_template,
                          machine=figures(registry.machine), extra={"media": False})  # it drafts text only
    from assistant.daemon.registry import check_complete

    try:
        await asyncio.get_running_loop().run_in_executor(None, check_complete, spec.path)
        await worker.run(instance.load, key, options)
    except BackendError as exc:  # ModelLoadError and the rest
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"draft model {name!r}: {exc}", {"draft_model": name}) from None
    worker.companions[key] = instance
    log.info("loaded draft model %s for %s from %s", name, worker.key, key)
    registry.emit("model.loaded", {"model": name, "backend": worker.backend.name, "path": key,
                                   "draft_for": worker.key})
    return instance


# -- the separate MTP drafter a model loads with -------------------------------------


def configured_mtp_model(config: Config, name: str) -> str | None:
    """``speculative.mtp_model`` for the alias ``name`` (its own entry over the top
    level): ``~`` expanded, a relative path taken from the config file's folder, as
    the models' paths are (``assistant.config.models``)."""
    from assistant.config.models import _abs_path

    own = getattr(config.models.get(name), "speculative", None)
    value = getattr(own, "mtp_model", None) or getattr(config.speculative, "mtp_model", None)
    if not value:
        return None
    source = getattr(config, "source", None)
    return str(_abs_path(str(value), Path(source).parent if source else None))


def mtp_model_for(config: Config, name: str, spec: "ModelSpec", drafter: str) -> tuple[str | None, list[str]]:
    """(the MTP drafter model to load beside ``spec``'s file, or None; what was
    decided, one line each). ``drafter`` is the alias's configured drafter.
    Raises ModelLoadError for a configured drafter that is missing, not a GGUF
    file, truncated, or does not pair with a GGUF target (its header) or an MLX
    folder target (its config.json), naming the difference."""
    from backends.mtp_pairing import check_assistant, find_sibling

    from assistant.daemon.registry import check_complete

    configured = configured_mtp_model(config, name)
    target = Path(spec.path) if spec.path else None  # a remote model has no file
    if drafter not in MTP_DRAFTERS:
        if configured:
            return None, [f"speculative.mtp_model {configured} not loaded: the drafter is {drafter!r}"]
        return None, []
    if configured:
        path = Path(configured)
        if not path.exists():
            raise ModelLoadError(f"speculative.mtp_model: MTP drafter {path} does not exist")
        if not path.is_file() and not path.is_dir():  # a pipe or a device: never opened
            raise ModelLoadError(f"speculative.mtp_model: MTP drafter {path} is not a regular file or folder")
        check_complete(path)  # a truncated download
        if target is not None and target.is_file():  # a GGUF target: the headers must pair
            check_assistant(target, path)
        elif target is not None and target.is_dir():  # an MLX folder: the config files must pair
            _check_mlx_assistant(target, path)
        return str(path), [f"{path.name}: configured (speculative.mtp_model)"]
    if target is None or not target.is_file():
        return None, []
    found, lines = find_sibling(target)
    if found is not None:
        try:
            check_complete(found)
        except ModelLoadError as exc:
            return None, [*lines, f"{Path(found).name}: ignored after all: {exc}"]
    return found, lines


def _check_mlx_assistant(target: Path, drafter: Path) -> None:
    """ModelLoadError naming every difference when the MLX assistant folder
    ``drafter`` does not pair with the MLX model folder ``target`` (config.json
    files alone; the backend checks again, and that mlx-vlm runs it, in load)."""
    from backends.mlx_mtp import pair_folders

    pairing = pair_folders(target, drafter)  # ModelLoadError: not a complete model folder
    if not pairing.ok:
        raise ModelLoadError(f"MTP drafter {pairing.why()}")


async def resolve_mmproj(name: str, spec: "ModelSpec", backend: str) -> str | None:
    """The alias's media projector (``models.NAME.mmproj``) for the llama.cpp backend,
    once its header pairs with the model's (``backends.mmproj_pairing``), off the event
    loop; MODEL_LOAD_FAILED naming both files when it does not (nothing has been
    loaded or unloaded yet). None: no projector configured."""
    if spec.mmproj is None:
        return None
    path = str(spec.mmproj)
    if backend == "llama.cpp" and Path(spec.path).is_file():
        from backends.mmproj_pairing import check_projector

        try:
            await asyncio.get_running_loop().run_in_executor(None, check_projector, spec.path, path)
        except ModelLoadError as exc:
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"model {name!r}: {exc}", {"mmproj": path}) from None
    return path


async def resolve_mtp_model(config: Config, name: str, spec: "ModelSpec") -> str | None:
    """:func:`mtp_model_for` with the alias's configured drafter, off the event loop, its
    lines logged; MODEL_LOAD_FAILED for a configured drafter that cannot be used
    (nothing has been loaded or unloaded yet)."""
    from assistant.daemon.chat_settings import configured

    drafter = configured(config, name).drafter
    loop = asyncio.get_running_loop()
    try:
        path, lines = await loop.run_in_executor(None, mtp_model_for, config, name, spec, drafter)
    except ModelLoadError as exc:
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"model {name!r}: {exc}", {"mtp_model": configured_mtp_model(
            config, name)}) from None
    for line in lines:
        log.info("%s: MTP drafter: %s", name, line)
    return path
