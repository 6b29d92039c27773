"""The ``mtp`` drafter: multi-token prediction, of one of two kinds
(``Backend.mtp_kind``):

- ``nextn``: the target model's own NextN layers (GLM-4.5, Qwen3-Next/3.5,
  MiMo, DeepSeek V3-style models that ship them; llama.cpp: an MTP context
  over the same model, fed the target's hidden states, ``backends/llamacpp_mtp.py``);
- ``assistant``: a separate drafter model paired with the target (Gemma 4's
  ``gemma4-assistant``, ``LoadOptions.mtp_model`` or an ``mtp-*.gguf`` beside
  the model file; llama.cpp: ``backends/llamacpp_mtp_assistant.py``).

Both draft through the backend's ``mtp_support`` and ``mtp_draft``; the
drafter's ``kind`` says which ran (the stats carry it beside ``drafter: mtp``)."""

from __future__ import annotations

import time

from backends.base import Backend

from assistant.inference.sampling import SamplingParams
from assistant.inference.speculative.drafter import MAX_DRAFT_LIMIT, Chooser, Draft, DrafterError, ema


def mtp_support(target: Backend) -> tuple[bool, str]:
    """Whether ``target`` can draft with MTP layers, and why not."""
    support = getattr(target, "mtp_support", None)
    if support is None:
        return False, f"its backend ({getattr(target, 'name', type(target).__name__)}) has no MTP support"
    return support()


def mtp_kind(target: Backend) -> str | None:
    """"nextn", "assistant" or None: which MTP drafter ``target`` runs (``Backend.mtp_kind``)."""
    kind = getattr(target, "mtp_kind", None)
    return kind() if callable(kind) else None


class MtpDrafter:
    """The target's multi-token-prediction drafter (its NextN layers or its
    paired assistant model: ``kind``) drafts (``Backend.mtp_draft``): greedy
    guesses, a point-mass draft, so sampled requests keep the target's
    distribution by the engine's point-mass rule. The backend keeps its MTP
    state in step with the target's cache. A model with neither is refused
    (DrafterError) naming the model and why."""

    name = "mtp"
    needs_costs = True

    def __init__(self, target: Backend):
        ok, why = mtp_support(target)
        if not ok:
            raise DrafterError(f"model {target.info.name!r} cannot use the 'mtp' drafter: {why}")
        self.target = target
        self.kind = mtp_kind(target)  # "nextn" | "assistant" (None: a backend that does not say)
        self.step_s: float | None = None  # measured time of one draft step

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        pass

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        k = choose("mtp", min(MAX_DRAFT_LIMIT, self.target.info.context_length - len(tokens)))
        if k <= 0:
            return None
        t0 = time.perf_counter()
        out = self.target.mtp_draft(tokens, k)
        dt = time.perf_counter() - t0
        if not out:
            return None
        self.step_s = ema(self.step_s, dt / len(out))
        return Draft(out, "mtp", None, dt)

    def token_cost(self, cls: str, plain_step: float) -> float:
        return self.step_s or 0.0

    def close(self) -> None:
        pass
