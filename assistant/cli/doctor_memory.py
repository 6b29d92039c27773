"""``assistant doctor``'s memory section: the memory plan for the configured
model (``backends.memory_plan``) line by line, and the context it leads to.

The plan is the one the daemon's ``context: auto`` loads with: the same
drafter (``speculative.mtp_model`` or an ``mtp-*.gguf`` beside the file),
the same KV cache types (Q8_0 K when the model drafts, as the registry asks
llama.cpp for), a ``mmproj-*.gguf`` projector beside the file, and this
machine's RAM. Only GGUF files have a plan; an MLX folder keeps the simpler
estimate in ``doctor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends import memory_plan as mp

from assistant.inference.speculative.calibration import DRAFTING_KV_TYPE
from assistant.machine import hardware

_WIDTH = 18  # the name column


def memory_section(config, name: str, spec, machine: hardware.Machine, backend: str,
                   requested: int | None, train_ctx: int) -> dict[str, Any] | None:
    """The plan for ``spec``'s GGUF file as plain data (``doctor --json``), None for a
    folder. Raises ModelLoadError for a model file whose header cannot be read."""
    from backends.gguf import read_header
    from backends.sizing import pick_context_planned

    path = Path(spec.path)
    if not path.is_file():
        return None
    header = read_header(path)
    drafter, notes = _drafter(config, name, spec, backend)
    projector = mp.find_projector(path, header)
    extra = {"kv_type": DRAFTING_KV_TYPE} if backend == "llama.cpp" and _drafting(config, name) else {}
    options = mp.PlanOptions.for_load(extra, mtp_model=drafter, mmproj=str(projector) if projector else None)
    ctx, why, plan = pick_context_planned(hardware.figures(machine), header, train_ctx=train_ctx,
                                          requested=requested, options=options)
    return {"context": ctx, "context_reason": why, "plan": plan.to_dict(), "against_ram": plan.against_ram(),
            "drafter": drafter, "drafter_notes": notes, "projector": str(projector) if projector else None,
            "settings": _settings(options)}


def _drafting(config, name: str) -> bool:
    """Whether the alias decodes with a drafter: what the registry sets Q8_0 K for."""
    from assistant.daemon.chat_settings import configured

    return configured(config, name).drafter != "off"


def _drafter(config, name: str, spec, backend: str) -> tuple[str | None, list[str]]:
    """The separate MTP drafter the daemon would load beside the model, and why."""
    from backends.base import ModelLoadError

    from assistant.daemon.chat_settings import configured
    from assistant.daemon.drafts import mtp_model_for

    if backend != "llama.cpp":
        return None, []
    try:
        return mtp_model_for(config, name, spec, configured(config, name).drafter)
    except ModelLoadError as exc:  # the drafter section says so; the plan goes on without it
        return None, [str(exc)]


def _settings(options: mp.PlanOptions) -> str:
    fa = "flash attention" if options.flash_attn else "no flash attention"
    swa = "full-size sliding-window cache" if options.swa_full else "window-sized sliding-window cache"
    return f"K {options.type_k} / V {options.type_v}, {fa}, {swa}, {options.n_ubatch}-token batches"


def render_memory(memory: dict[str, Any] | None) -> list[str]:
    """The section's lines for ``doctor``'s text report (none without a plan)."""
    if not memory:
        return []
    plan = memory["plan"]
    out = [f"memory:   plan at {plan['context']} tokens ({memory['settings']})"]
    for line in plan["lines"]:
        out.append(f"          {line['name']:<{_WIDTH}} {mp.size(line['bytes']):>10}  {line['detail']}")
    out.append(f"          {'total':<{_WIDTH}} {mp.size(plan['total']):>10}  {memory['against_ram']}")
    return out


def apply(model: dict[str, Any], config, spec, machine: hardware.Machine, backend: str,
          requested: int | None) -> None:
    """Put the plan into doctor's ``model`` report: ``memory``, and the context and
    fit it leads to (over the simpler estimate) for a GGUF file."""
    memory = memory_section(config, model["name"], spec, machine, backend, requested,
                            int(model.get("context_length") or 0))
    if memory is None:
        return
    plan = memory["plan"]
    model.update(memory=memory, context=memory["context"], context_reason=memory["context_reason"],
                 fits=plan["fits"] is not False,
                 fit_reason=f"{mp.size(plan['total'])} {memory['against_ram']}")
