"""Model methods: list what exists, load, unload (all through the model registry)."""

from __future__ import annotations

import asyncio
from typing import Any

from assistant.config.models import list_models
from assistant.daemon import params
from assistant.daemon.methods import MethodTable

rpc = MethodTable()


@rpc.method("models.list")
async def models_list(d, req, _p) -> dict[str, Any]:
    available = await asyncio.get_running_loop().run_in_executor(None, list_models, d.config)
    return {"loaded": d.models.describe(), "available": available, "default": d.config.model}


@rpc.method("models.load", params.ModelsLoad)
async def models_load(d, req, p: params.ModelsLoad) -> dict[str, Any]:
    worker = await d.models.get(p.model or d.config.model, backend=p.backend, context=p.context, threads=p.threads)
    return worker.describe()


@rpc.method("models.unload", params.ModelsUnload)
async def models_unload(d, req, p: params.ModelsUnload) -> dict[str, Any]:
    await d.models.unload(p.model)
    return {"unloaded": p.model}
