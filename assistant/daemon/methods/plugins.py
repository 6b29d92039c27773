"""Plugin methods: what plugins are loaded, their skills, and calling a skill."""

from __future__ import annotations

from typing import Any

from assistant.daemon import params
from assistant.daemon.methods import MethodTable

rpc = MethodTable()


@rpc.method("plugins.list")
async def plugins_list(d, req, _p) -> dict[str, Any]:
    return {"plugins": d.plugins.list()}


@rpc.method("skills.list")
async def skills_list(d, req, _p) -> dict[str, Any]:
    return {"skills": [s.describe() for s in d.plugins.skills.values()]}


@rpc.method("skills.call", params.SkillsCall)
async def skills_call(d, req, p: params.SkillsCall) -> dict[str, Any]:
    return {"result": await d.call_skill(p.name, p.arguments)}
