"""Drafters by name: the built-in factories (:data:`BUILTIN_DRAFTERS`, which
the core plugin registers like any plugin's) and :class:`DrafterRegistry`,
the object the daemon fills from the ``register_drafters`` hook and asks
for a request's drafter."""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Mapping

from assistant.inference.speculative.auto import AutoDrafter
from assistant.inference.speculative.drafter import (MODES, DraftContext, Drafter, DrafterError, DrafterFactory,
                                                     check_max_draft, check_ngram)
from assistant.inference.speculative.model import ModelDrafter, check_draft_pair
from assistant.inference.speculative.mtp import MtpDrafter, mtp_support
from assistant.inference.speculative.ngram import NgramDrafter


def _model_drafter(ctx: DraftContext) -> ModelDrafter:
    """The draft model the caller loaded, checked against the target."""
    if ctx.draft is None:
        raise DrafterError(
            "the 'draft' drafter needs a draft model: set speculative.draft_model in the config "
            "(top level or for this model) or pass draft_model with the request")
    check_draft_pair(ctx.target, ctx.draft, draft_name=ctx.draft_name)
    return ModelDrafter(ctx.draft, ctx.target)


def _ngram(ctx: DraftContext) -> NgramDrafter:
    """Prompt lookup; the target's end-of-generation tokens end its drafts."""
    try:
        stop = tuple(ctx.target.info.eos_token_ids or ())
    except Exception:  # noqa: BLE001 - a backend without info drafts without stops
        stop = ()
    return NgramDrafter(ctx.ngram_min, ctx.ngram_max, stop_ids=stop)


def ngram_factory(ctx: DraftContext) -> Drafter:
    return _ngram(ctx)


def draft_factory(ctx: DraftContext) -> Drafter:
    return _model_drafter(ctx)


def mtp_factory(ctx: DraftContext) -> Drafter:
    return MtpDrafter(ctx.target)


def auto_factory(ctx: DraftContext) -> Drafter:
    """Prompt lookup, plus the draft model when one is given, else the
    target's MTP layers when it has them."""
    model: ModelDrafter | MtpDrafter | None = None
    if ctx.draft is not None:
        model = _model_drafter(ctx)
    elif mtp_support(ctx.target)[0]:
        model = MtpDrafter(ctx.target)
    return AutoDrafter(_ngram(ctx), model)


# Read-only: a registry is an object the daemon owns, not this module's state.
BUILTIN_DRAFTERS: Mapping[str, DrafterFactory] = MappingProxyType(
    {"ngram": ngram_factory, "draft": draft_factory, "mtp": mtp_factory})


class DrafterRegistry:
    """Drafter factories by name. ``auto`` and ``off`` are modes, always
    known and never registered. Registration takes a lock; lookups may run
    on any model thread."""

    def __init__(self, factories: Mapping[str, DrafterFactory] | None = None):
        self._factories: dict[str, DrafterFactory] = {}
        self._lock = threading.Lock()
        for name, factory in (factories or {}).items():
            self.register(name, factory)

    def register(self, name: str, factory: DrafterFactory) -> None:
        """Make a drafter available by name (a later registration replaces an
        earlier one). Raises DrafterError for a reserved or empty name or a
        factory that is not callable."""
        if not isinstance(name, str) or not name or name in MODES:
            raise DrafterError(f"drafter name {name!r} is not allowed (reserved: {', '.join(MODES)})")
        if not callable(factory):
            raise DrafterError(f"drafter {name!r}: factory is not callable")
        with self._lock:
            self._factories[name] = factory

    def names(self) -> list[str]:
        """Every name ``draft`` accepts: ``auto``, the registered drafters (sorted), ``off``."""
        with self._lock:
            return ["auto", *sorted(self._factories), "off"]

    def check(self, name: str) -> str:
        """``name`` if it is a mode or a registered drafter, else DrafterError listing the known names."""
        if name in MODES or name in self._factories:
            return name
        raise DrafterError(f"unknown drafter {name!r}; known: {', '.join(self.names())}")

    def make(self, name: str, ctx: DraftContext) -> Drafter | None:
        """The drafter called ``name`` for one request (None for ``off``).
        Raises DrafterError (bad settings) or DraftModelError (draft model)."""
        self.check(name)
        check_max_draft(ctx.max_draft)
        check_ngram(ctx.ngram_min, ctx.ngram_max)
        if name == "off":
            return None
        if name == "auto":
            return auto_factory(ctx)
        return self._factories[name](ctx)
