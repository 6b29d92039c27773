"""How a chat request decodes: its sampling and speculative settings.

Sampling precedence: the request's own parameters, then the ``generation:``
keys the config file sets, then (for keys it leaves out) what the model
comes with, then the built-in defaults. Speculative settings: the request's
(``draft``, ``max_draft``, ``draft_model``), then the model alias's
``speculative:`` entry, then the top-level one. Scheduling: the request's
``priority`` (default interactive) and ``keep_alive`` (default: the config's).
Structured output: the request's ``response_format`` (checked and compiled by
``params.Chat``), carried on ``SamplingParams.response_format``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from backends.base import Backend

from assistant.config import Config, parse_duration
from assistant.config.models import ModelSpec
from assistant.daemon.params import Chat, invalid, random_seed
from assistant.daemon.worker import PRIORITIES, UNSET
from assistant.inference import speculative
from assistant.inference.constraints import ResponseFormat
from assistant.inference.sampling import SamplingParams


def sampling(p: Chat, config: Config, model: ModelSpec | None = None) -> tuple[SamplingParams, int]:
    """The request's sampling parameters and max_tokens."""
    g = config.generation
    own = (model.generation if model is not None else None) or {}
    if own:
        g = dataclasses.replace(g, **{k: v for k, v in own.items()
                                      if f"generation.{k}" not in config.given and hasattr(g, k)})

    def pick(name: str) -> Any:
        value = getattr(p, name)
        return getattr(g, name) if value is None else value

    params = SamplingParams(
        temperature=float(pick("temperature")), top_p=float(pick("top_p")), top_k=pick("top_k"),
        min_p=float(pick("min_p")), repeat_penalty=float(pick("repeat_penalty")),
        seed=None if pick("seed") is None else random_seed(pick("seed")),
        response_format=response_format(p))
    return params, pick("max_tokens")


def response_format(p: Chat) -> ResponseFormat | None:
    """What the reply must be (structured output), as ``params.Chat`` parsed it: None for
    free text. ``SamplingParams.response_format`` carries it to ``generate``, which
    constrains locally; a backend that forwards requests sends ``.to_openai()``."""
    return p.response_format


@dataclass
class SpecSettings:
    """One request's speculative-decoding settings."""

    drafter: str
    max_draft: int
    draft_model: str | None
    ngram_min: int
    ngram_max: int

    def wants_draft_model(self) -> bool:
        """Whether the drafter may use a draft model (loaded before the request runs)."""
        return bool(self.draft_model) and self.drafter not in ("off", "ngram", "mtp")


def configured(config: Config, model: str) -> SpecSettings:
    """The config's speculative settings for a model alias (its own entry over the top level)."""
    top = config.speculative
    out = SpecSettings(top.drafter, top.max_draft, top.draft_model, top.ngram_min, top.ngram_max)
    own = getattr(config.models.get(model), "speculative", None)
    if own is not None:
        for key in ("drafter", "max_draft", "draft_model"):
            if getattr(own, key) is not None:
                setattr(out, key, getattr(own, key))
    return out


def requested(p: Chat, drafters: speculative.DrafterRegistry) -> dict[str, Any]:
    """The request's own speculative settings, checked (INVALID_PARAMS naming the parameter)."""
    out: dict[str, Any] = {}
    try:
        if p.draft is not None:
            out["drafter"] = drafters.check(p.draft)
    except speculative.DrafterError as exc:
        raise invalid(f"parameter 'draft': {exc}") from None
    try:
        if p.max_draft is not None:
            out["max_draft"] = speculative.check_max_draft(p.max_draft)
    except speculative.DrafterError as exc:
        raise invalid(f"parameter 'max_draft': {exc}") from None
    if p.draft_model is not None:
        out["draft_model"] = p.draft_model
    return out


def config_errors(config: Config, drafters: speculative.DrafterRegistry) -> list[str]:
    """Unknown drafter names in the config, as ``key: message`` (checked once plugins registered theirs)."""
    keys = [("speculative.drafter", config.speculative.drafter)]
    keys += [(f"models.{name}.speculative.drafter", m.speculative.drafter)
             for name, m in config.models.items()
             if getattr(m, "speculative", None) is not None and m.speculative.drafter is not None]
    errors = []
    for key, value in keys:
        try:
            drafters.check(value)
        except speculative.DrafterError as exc:
            errors.append(f"{key}: {exc}")
    return errors


def engine(spec: SpecSettings, target: Backend, draft: Backend | None, drafters: speculative.DrafterRegistry,
           calibration: speculative.CalibrationStore | None,
           costs: speculative.CostModel | None) -> speculative.SpeculativeEngine | None:
    """The request's engine (None for ``off``), built on the model's thread. ``costs`` is the
    target's measured step and verify costs, kept with the loaded model across requests.
    Raises DrafterError / DraftModelError."""
    if spec.drafter == "off":
        return None
    ctx = speculative.DraftContext(target=target, max_draft=spec.max_draft, ngram_min=spec.ngram_min,
                                   ngram_max=spec.ngram_max, draft=draft, draft_name=spec.draft_model)
    drafter = drafters.make(spec.drafter, ctx)
    if drafter is None:
        return None
    return speculative.SpeculativeEngine(drafter, max_draft=spec.max_draft, calibration=calibration, costs=costs)


def priority(p: Chat) -> int:
    """The request's scheduling priority (``worker.INTERACTIVE`` unless it says background)."""
    return PRIORITIES[p.priority or "interactive"]


def keep_alive(p: Chat) -> Any:
    """How long the model stays loaded after this request: seconds, None for forever,
    ``UNSET`` when the request does not say (the config's then)."""
    if p.keep_alive is None:
        return UNSET
    try:
        return parse_duration(p.keep_alive)
    except ValueError as exc:
        raise invalid(f"parameter 'keep_alive': {exc} (-1: never unload, 0: unload right after)") from None
