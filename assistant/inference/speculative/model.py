"""The ``draft`` drafter: a second, smaller model with the same tokenizer
(:class:`ModelDrafter`), and the check that a pair can be used at all
(:func:`check_draft_pair`). The caller loads the draft model (the daemon's
model registry, with the target's backend class); this module only judges
and drives it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from backends.base import Backend
from backends.media import text_only

from assistant.inference.generation import common_prefix
from assistant.inference.sampling import Sampler, SamplingParams
from assistant.inference.speculative.drafter import MAX_DRAFT_LIMIT, Chooser, Draft, DraftModelError, ema

SAMPLE_TEXT = "Hello, world! def f(x):\n    return x * 2  # ünïcödé 12345"


def check_draft_pair(target: Backend, draft: Backend, *, target_name: str | None = None,
                     draft_name: str | None = None) -> None:
    """Refuse a draft model that does not share the target's tokenizer.

    Compared: vocabulary size, BOS and end-of-generation tokens, the bytes of
    a sample of tokens (the first 256, then every ~1/600th of the vocabulary,
    then the last 64) and the tokenization of a sample text. The error
    (DraftModelError) names what differs."""
    ti, di = target.info, draft.info
    tname = target_name or ti.name
    dname = draft_name or di.name
    problems = []
    if ti.vocab_size != di.vocab_size:
        problems.append(f"vocabulary sizes differ ({ti.vocab_size} in the target, {di.vocab_size} in the draft)")
    if ti.bos_token_id != di.bos_token_id:
        problems.append(f"BOS tokens differ ({ti.bos_token_id} vs {di.bos_token_id})")
    if sorted(ti.eos_token_ids) != sorted(di.eos_token_ids):
        problems.append(f"end-of-generation tokens differ ({sorted(ti.eos_token_ids)} vs {sorted(di.eos_token_ids)})")
    if not problems:
        problems += _tokenizer_differences(target, draft)
    if problems:
        raise DraftModelError(f"draft model {dname!r} cannot draft for {tname!r}: " + "; ".join(problems))


def _tokenizer_differences(target: Backend, draft: Backend) -> list[str]:
    """Where two tokenizers of the same size differ: a sample of token texts, then a sample text."""
    v = target.info.vocab_size
    sample = sorted(set(range(min(v, 256))) | set(range(256, v, max(1, v // 600))) | set(range(max(0, v - 64), v)))
    diffs = [t for t in sample if target.token_bytes(t) != draft.token_bytes(t)]
    if diffs:
        t = diffs[0]
        more = f" (and {len(diffs) - 1} more of {len(sample)} sampled)" if len(diffs) > 1 else ""
        return [f"token texts differ: token {t} is {target.token_bytes(t)!r} in the target but "
                f"{draft.token_bytes(t)!r} in the draft{more}"]
    a, b = target.tokenize(SAMPLE_TEXT, add_bos=False), draft.tokenize(SAMPLE_TEXT, add_bos=False)
    if a != b:
        return [f"the two tokenizers split a sample text differently ({a[:8]}... vs {b[:8]}...)"]
    return []


def weights_bytes(backend: Backend) -> int | None:
    """Bytes of a loaded model's weight files (a GGUF file, or a folder's
    *.safetensors), or None where unknown."""
    try:
        path = Path(backend.info.path)
        if path.is_dir():
            return sum(f.stat().st_size for f in path.glob("*.safetensors")) or None
        return path.stat().st_size
    except (AttributeError, OSError, TypeError, ValueError):
        return None


class ModelDrafter:
    """A smaller model with the same tokenizer drafts token by token.

    Its KV cache is kept in step with the target's text lazily: before each
    draft it is cut back to the prefix it shares with the text and the
    missing tokens are evaluated in one batch. Greedy requests draft greedily
    (a point-mass draft); sampled requests sample the draft from the draft
    model's own distribution with the same sampling settings and hand it to
    the rejection rule.

    A prompt with media (placeholder ids, ``backends.media``): the draft model
    sees its text only (``text_only``), the media left out; what the target
    writes after them it sees as written. Its drafts are guesses the target
    verifies, so a draft model that never saw the image costs acceptance, not
    correctness."""

    name = "draft"
    needs_costs = True  # the engine measures verify costs before its first proposal

    def __init__(self, model: Backend, target: Backend | None = None):
        self.model = model
        self._sampler: Sampler | None = None
        self.step_s: float | None = None  # measured time of one draft step
        # Before the first draft is timed: a draft step costs about what its
        # weights weigh against the target's (decoding reads every weight once
        # per token), so a draft model as big as the target is never tried.
        self.relative_cost: float | None = None
        # (length of the request's prompt, its text without media), when it has media
        self._text: tuple[int, list[int]] | None = None
        if target is not None:
            mine, theirs = weights_bytes(model), weights_bytes(target)
            if mine and theirs:
                self.relative_cost = mine / theirs

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        self._text = (len(tokens), text_only(tokens)) if tokens and min(tokens) < 0 else None
        if params.greedy:
            self._sampler = None
        else:
            seed = None if params.seed is None else (params.seed * 7919 + 17) % (2**32)
            self._sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        m = self.model
        if self._text is not None:  # the prompt's media are not the draft model's to see
            n_prompt, text = self._text
            tokens = text + tokens[n_prompt:]
        k = choose("draft", min(MAX_DRAFT_LIMIT, m.info.context_length - len(tokens)))
        if k <= 0:
            return None
        t0 = time.perf_counter()
        # The last token is always evaluated: its logits are needed.
        m.truncate(min(common_prefix(m.cached_tokens, tokens), len(tokens) - 1))
        n = len(m.cached_tokens)  # a cache that could not be cut there was cleared
        catch_up = len(tokens) - n
        logits = m.forward(tokens[n:])[-1]
        t1 = time.perf_counter()
        out, q = self._draft(logits, tokens, k)
        t2 = time.perf_counter()
        dt = t2 - t0
        # The time of one draft step: catching up with many tokens (the prompt,
        # text written while drafting was off) is a one-off, not a step.
        per = dt / k if catch_up <= 2 else ((t2 - t1) / (k - 1) if k > 1 else None)
        if per is not None:
            self.step_s = ema(self.step_s, per)
        return Draft(out, "draft", q, dt)

    def _draft(self, logits: np.ndarray, tokens: list[int],
               k: int) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]] | None]:
        """``k`` tokens from the draft model, starting from ``logits``; with
        their distributions for a sampled request."""
        m, sampler = self.model, self._sampler
        out: list[int] = []
        q: list[tuple[np.ndarray, np.ndarray]] | None = None if sampler is None else []
        for i in range(k):
            if sampler is None:
                tok = int(np.argmax(logits))
            else:
                cand, probs = sampler.distribution(logits, tokens + out if sampler.params.repeat_penalty != 1.0 else ())
                tok = int(cand[sampler.choice(probs)])
                q.append((cand, probs))
            out.append(tok)
            if i + 1 < k:
                logits = m.forward((tok,))[-1]
        return out, q

    def token_cost(self, cls: str, plain_step: float) -> float:
        """Measured seconds per draft step, else the weight-based estimate, else free."""
        if self.step_s is not None:
            return self.step_s
        return self.relative_cost * plain_step if self.relative_cost is not None else 0.0

    def close(self) -> None:
        self._sampler = None
        self._text = None
