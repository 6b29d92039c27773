"""Speculative decoding: one engine over ``Backend.forward`` + ``Backend.truncate``.

A *drafter* guesses the next few tokens cheaply; the target model checks all
of them in one ``forward`` (logits only at the verified positions), keeps the
longest correct prefix plus one token of its own, and ``truncate`` drops the
rest from the KV cache. Any backend with ``forward`` and ``truncate`` (llama.cpp,
MLX, a plugin's) gets it for free.

Drafters (``DRAFTERS``, a registry by name; plugins add more through the
``register_drafters`` hook, which calls :func:`register_drafter`):

- ``ngram``: prompt lookup. An index of every n-gram (``ngram_min`` ..
  ``ngram_max`` tokens) of the prompt, the conversation history (it is part of
  the prompt) and the text generated so far; when the last tokens were seen
  before, the tokens that followed them are the draft. No extra model; costs
  a few microseconds per token.
- ``draft``: a second, smaller model with the same tokenizer, loaded through
  the same backend class (:func:`check_draft_pair` refuses a pair whose
  vocabulary, special tokens or token texts differ).
- ``mtp``: the target model's own multi-token-prediction (NextN) layers
  (GLM-4.5, Qwen3-Next/3.5, MiMo, DeepSeek V3-style models that ship them),
  through the backend's ``mtp_draft`` (llama.cpp: an MTP context over the
  same model, fed the target's hidden states; see ``backends/llamacpp.py``).
  Greedy drafts, verified like any other: a model without such layers is
  refused naming the model and why.
- ``auto``: prompt lookup where the answer copies from its input (long n-gram
  matches), else the draft model when one is configured, else the model's
  MTP layers when it has them.

Correctness:

- Greedy: a draft token is kept only if it is the token plain decoding would
  have picked from the same logits. That makes the output identical to plain
  decoding *if* the backend computes a verified row exactly as it computes a
  one-token step. llama.cpp does so only up to a batch size that depends on
  the model's tensor types and the CPU (see :func:`calibrate`, and the
  figures in tests/test_speculative.py): the engine measures that size once
  per model file and machine (kept in the user cache dir) and never
  verifies more tokens at once (``exact=True``).
- Temperature > 0: the rejection rule of Leviathan et al. / Chen et al.:
  accept draft token d with probability min(1, p(d)/q(d)), on rejection
  sample from the normalised residual max(0, p - q); the output is then
  distributed exactly as the target's (p is the request's sampler
  distribution: penalties, top-k, top-p, min-p, temperature). For drafters
  whose draft is one fixed token (q a point mass: ``ngram``, a greedy draft
  model) the rule reads "accept with probability p(d), else sample from p
  without d", which is the same as drawing x from p with the sampler's own
  random stream and keeping d when x == d: the engine does exactly that, so a
  seeded request gives the very same text as plain decoding.

Adaptive control (:class:`Controller`): every drafted token belongs to a
class (for ``ngram`` the length of the matched context, for a model "draft");
acceptance is measured per class, the cost of a verify batch of n tokens and
of a plain step per loaded model (:class:`CostModel`). The draft length is the
one with the best expected tokens per second, and 0 (a plain step) when no
length beats plain decoding. If the realised speed of the recent verify
steps falls below plain decoding anyway, drafting pauses for the request
(32 tokens, doubling each time) and then probes again.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from backends.base import Backend

from assistant.inference.sampling import Sampler, SamplingParams

MAX_DRAFT_LIMIT = 64  # max_draft is 1..MAX_DRAFT_LIMIT
DEFAULT_MAX_DRAFT = 32
DEFAULT_NGRAM_MIN = 2
DEFAULT_NGRAM_MAX = 8
MODES = ("auto", "off")  # names that are not drafters


class DrafterError(ValueError):
    """A bad speculative-decoding setting (unknown drafter, max_draft out of range, ...)."""


class DraftModelError(DrafterError):
    """The draft model cannot be used: missing, failed to load, or not compatible with the target."""


# --------------------------------------------------------------------------
# Drafter interface and registry


@dataclass
class Draft:
    """Proposed tokens. ``q`` is None for a point-mass draft (each token is
    the drafter's single guess), else per token the drafter's distribution
    ``(candidate ids, probabilities)`` the token was sampled from."""

    tokens: list[int]
    cls: str
    q: list[tuple[np.ndarray, np.ndarray]] | None = None
    cost_s: float = 0.0  # time the drafter spent making it


# choose(cls, available) -> how many tokens to draft now (0: do not draft)
Chooser = Callable[[str, int], int]


class Drafter(Protocol):
    """What the engine needs from a drafter. One instance serves one request."""

    name: str

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        """A request starts; ``tokens`` is the prompt, and the engine appends
        every generated token to this same list (the drafter may keep it)."""

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        """Draft a continuation of ``tokens``. Call ``choose(cls, available)``
        once the class of this draft and the most tokens it could offer are
        known, and draft at most that many (0: return None)."""

    def close(self) -> None:
        """The request is over."""

    # Optional, for drafters that spend time drafting (a model):
    #   needs_costs: bool  -- the engine measures verify costs before the first proposal
    #   token_cost(cls, plain_step) -> float  -- seconds per drafted token of class cls
    # A drafter without token_cost drafts for free (prompt lookup).


def _ema(old: float | None, new: float) -> float:
    """A measured time that follows the recent ones."""
    return new if old is None else 0.8 * old + 0.2 * new


@dataclass
class DraftContext:
    """What a drafter factory gets to build a drafter for one request."""

    target: Backend
    max_draft: int = DEFAULT_MAX_DRAFT
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    draft_model: str | None = None  # alias or path, as configured
    # Loads (or returns the already loaded) draft model through the target's
    # backend class; raises DraftModelError. None where nothing can be loaded.
    load_model: Callable[[str], Backend] | None = None
    options: dict[str, Any] = field(default_factory=dict)


DrafterFactory = Callable[[DraftContext], Drafter]

DRAFTERS: dict[str, DrafterFactory] = {}
_registry_lock = threading.Lock()


def register_drafter(name: str, factory: DrafterFactory) -> None:
    """Make a drafter available by name (the plugin host calls this)."""
    if not isinstance(name, str) or not name or name in MODES:
        raise DrafterError(f"drafter name {name!r} is not allowed (reserved: {', '.join(MODES)})")
    if not callable(factory):
        raise DrafterError(f"drafter {name!r}: factory is not callable")
    with _registry_lock:
        DRAFTERS[name] = factory


def drafter_names() -> list[str]:
    """Every name ``draft`` accepts: the modes and the registered drafters."""
    return ["auto", *sorted(DRAFTERS), "off"]


def check_name(name: str) -> str:
    if name in MODES or name in DRAFTERS:
        return name
    raise DrafterError(f"unknown drafter {name!r}; known: {', '.join(drafter_names())}")


def check_max_draft(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_LIMIT:
        raise DrafterError(f"max_draft must be an integer from 1 to {MAX_DRAFT_LIMIT}, got {value!r}")
    return value


def check_ngram(nmin: Any, nmax: Any) -> tuple[int, int]:
    for v in (nmin, nmax):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
            raise DrafterError(f"n-gram sizes must be integers from 1 to 32, got {v!r}")
    if nmin > nmax:
        raise DrafterError(f"ngram_min ({nmin}) is larger than ngram_max ({nmax})")
    return nmin, nmax


# --------------------------------------------------------------------------
# Prompt lookup


def _match_class(length: int) -> str:
    if length >= 16:
        return "ngram:16+"
    if length >= 8:
        return "ngram:8+"
    if length >= 5:
        return "ngram:5+"
    return f"ngram:{length}"


class NgramDrafter:
    """Prompt lookup: continue the most recent earlier occurrence of the
    longest n-gram (``ngram_max`` down to ``ngram_min`` tokens) that ends the
    text so far. The class of a draft is the length of the matched context
    (extended backwards up to 32 tokens): long matches are copies."""

    name = "ngram"

    def __init__(self, ngram_min: int = DEFAULT_NGRAM_MIN, ngram_max: int = DEFAULT_NGRAM_MAX):
        self.nmin, self.nmax = check_ngram(ngram_min, ngram_max)
        self.begin([])

    def begin(self, tokens: list[int], params: SamplingParams | None = None) -> None:
        self._tokens = tokens
        self._index: list[dict[tuple[int, ...], int]] = [dict() for _ in range(self.nmax + 1)]
        self._done = 0  # continuation positions e < _done are indexed

    def _update(self, toks: list[int]) -> None:
        # Index the n-grams that end at e (exclusive) for every e whose
        # continuation toks[e] exists; later occurrences overwrite earlier ones.
        end = len(toks) - 1
        index, nmin, nmax = self._index, self.nmin, self.nmax
        for e in range(max(self._done, nmin), end + 1):
            for n in range(nmin, min(nmax, e) + 1):
                index[n][tuple(toks[e - n : e])] = e
        if end + 1 > self._done:
            self._done = end + 1

    def lookup(self, toks: list[int]) -> tuple[int, int] | None:
        """(position the continuation starts at, matched context length) or None."""
        if len(toks) > self._done:
            self._update(toks)
        size = len(toks)
        index = self._index
        for n in range(min(self.nmax, size - 1), self.nmin - 1, -1):
            e = index[n].get(tuple(toks[size - n :]))
            if e is not None:
                j = n
                while j < 32 and e - j - 1 >= 0 and toks[e - j - 1] == toks[size - j - 1]:
                    j += 1
                return e, j
        return None

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        hit = self.lookup(tokens)
        if hit is None:
            return None
        e, length = hit
        cls = _match_class(length)
        k = choose(cls, len(tokens) - e)
        if k <= 0:
            return None
        return Draft(tokens[e : e + k], cls)

    def close(self) -> None:
        self.begin([])


# --------------------------------------------------------------------------
# Draft model


def check_draft_pair(target: Backend, draft: Backend, *, target_name: str | None = None,
                     draft_name: str | None = None) -> None:
    """Refuse a draft model that does not share the target's tokenizer.

    Compared: vocabulary size, BOS and end-of-generation tokens, the bytes of
    a sample of tokens (the first 256, then every ~1/600th of the vocabulary,
    then the last 64) and the tokenization of a sample text. The error names
    what differs."""
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
        v = ti.vocab_size
        sample = sorted(set(range(min(v, 256))) | set(range(256, v, max(1, v // 600))) | set(range(max(0, v - 64), v)))
        diffs = [t for t in sample if target.token_bytes(t) != draft.token_bytes(t)]
        if diffs:
            t = diffs[0]
            more = f" (and {len(diffs) - 1} more of {len(sample)} sampled)" if len(diffs) > 1 else ""
            problems.append(f"token texts differ: token {t} is {target.token_bytes(t)!r} in the target but "
                            f"{draft.token_bytes(t)!r} in the draft{more}")
        else:
            text = "Hello, world! def f(x):\n    return x * 2  # ünïcödé 12345"
            a, b = target.tokenize(text, add_bos=False), draft.tokenize(text, add_bos=False)
            if a != b:
                problems.append(f"the two tokenizers split a sample text differently ({a[:8]}... vs {b[:8]}...)")
    if problems:
        raise DraftModelError(f"draft model {dname!r} cannot draft for {tname!r}: " + "; ".join(problems))


class ModelDrafter:
    """A smaller model with the same tokenizer drafts token by token.

    Its KV cache is kept in step with the target's text lazily: before each
    draft it is cut back to the prefix it shares with the text and the
    missing tokens are evaluated in one batch. Greedy requests draft greedily
    (a point-mass draft); sampled requests sample the draft from the draft
    model's own distribution with the same sampling settings and hand it to
    the rejection rule."""

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
        if target is not None:
            mine, theirs = _weights_bytes(model), _weights_bytes(target)
            if mine and theirs:
                self.relative_cost = mine / theirs

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        if params.greedy:
            self._sampler = None
        else:
            seed = None if params.seed is None else (params.seed * 7919 + 17) % (2**32)
            self._sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        m = self.model
        k = choose("draft", min(MAX_DRAFT_LIMIT, m.info.context_length - len(tokens)))
        if k <= 0:
            return None
        t0 = time.perf_counter()
        cached = m.cached_tokens
        n = 0
        top = min(len(cached), len(tokens) - 1)  # the last token is always evaluated: its logits are needed
        while n < top and cached[n] == tokens[n]:
            n += 1
        m.truncate(n)
        n = len(m.cached_tokens)  # a cache that could not be cut there was cleared
        catch_up = len(tokens) - n
        logits = m.forward(tokens[n:])[-1]
        t1 = time.perf_counter()
        out: list[int] = []
        q: list[tuple[np.ndarray, np.ndarray]] | None = None if self._sampler is None else []
        for i in range(k):
            if self._sampler is None:
                tok = int(np.argmax(logits))
            else:
                cand, probs = self._sampler.distribution(logits, tokens + out if self._sampler.params.repeat_penalty != 1.0 else ())
                tok = int(cand[self._sampler.choice(probs)])
                q.append((cand, probs))
            out.append(tok)
            if i + 1 < k:
                logits = m.forward((tok,))[-1]
        t2 = time.perf_counter()
        dt = t2 - t0
        # The time of one draft step: catching up with many tokens (the prompt,
        # text written while drafting was off) is a one-off, not a step.
        per = dt / k if catch_up <= 2 else ((t2 - t1) / (k - 1) if k > 1 else None)
        if per is not None:
            self.step_s = _ema(self.step_s, per)
        return Draft(out, "draft", q, dt)

    def token_cost(self, cls: str, plain_step: float) -> float:
        """Measured seconds per draft step, else the weight-based estimate, else free."""
        if self.step_s is not None:
            return self.step_s
        return self.relative_cost * plain_step if self.relative_cost is not None else 0.0

    def close(self) -> None:
        self._sampler = None


def _mtp_support(target: Backend) -> tuple[bool, str]:
    support = getattr(target, "mtp_support", None)
    if support is None:
        return False, f"its backend ({getattr(target, 'name', type(target).__name__)}) has no MTP support"
    return support()


class MtpDrafter:
    """The target model's own multi-token-prediction (NextN) layers draft
    (``Backend.mtp_draft``): greedy guesses, a point-mass draft, so sampled
    requests keep the target's distribution by the engine's point-mass rule.
    The backend keeps its MTP cache in step with the target's lazily."""

    name = "mtp"
    needs_costs = True

    def __init__(self, target: Backend):
        ok, why = _mtp_support(target)
        if not ok:
            raise DrafterError(f"model {target.info.name!r} cannot use the 'mtp' drafter: {why}")
        self.target = target
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
        self.step_s = _ema(self.step_s, dt / len(out))
        return Draft(out, "mtp", None, dt)

    def token_cost(self, cls: str, plain_step: float) -> float:
        return self.step_s or 0.0

    def close(self) -> None:
        pass


class AutoDrafter:
    """``auto``: prompt lookup where the text being written copies earlier
    text (and the controller expects it to pay), else ``model``: the draft
    model when one is configured, or the model's MTP layers."""

    def __init__(self, ngram: NgramDrafter, model: ModelDrafter | MtpDrafter | None):
        self.ngram = ngram
        self.model = model
        self.name = f"auto(ngram+{model.name})" if model is not None else "auto(ngram)"

    @property
    def needs_costs(self) -> bool:
        return self.model is not None

    def token_cost(self, cls: str, plain_step: float) -> float:
        """The model's drafts cost its steps; prompt lookup's are free."""
        if self.model is not None and cls == self.model.name:
            return self.model.token_cost(cls, plain_step)
        return 0.0

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        self.ngram.begin(tokens, params)
        if self.model is not None:
            self.model.begin(tokens, params)

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        d = self.ngram.propose(tokens, choose)
        if d is not None or self.model is None:
            return d
        return self.model.propose(tokens, choose)

    def close(self) -> None:
        self.ngram.close()
        if self.model is not None:
            self.model.close()


def _ngram_factory(ctx: DraftContext) -> Drafter:
    return NgramDrafter(ctx.ngram_min, ctx.ngram_max)


def _load_draft(ctx: DraftContext) -> ModelDrafter:
    if not ctx.draft_model:
        raise DrafterError(
            "the 'draft' drafter needs a draft model: set speculative.draft_model in the config "
            "(top level or for this model) or pass draft_model with the request")
    if ctx.load_model is None:
        raise DraftModelError(f"cannot load draft model {ctx.draft_model!r} here")
    model = ctx.load_model(ctx.draft_model)
    check_draft_pair(ctx.target, model, draft_name=ctx.draft_model)
    return ModelDrafter(model, ctx.target)


def _weights_bytes(backend: Backend) -> int | None:
    """Bytes of a loaded model's weight files (a GGUF file, or a folder's
    *.safetensors), or None where unknown."""
    try:
        path = Path(backend.info.path)
        if path.is_dir():
            return sum(f.stat().st_size for f in path.glob("*.safetensors")) or None
        return path.stat().st_size
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def _draft_factory(ctx: DraftContext) -> Drafter:
    return _load_draft(ctx)


def _mtp_factory(ctx: DraftContext) -> Drafter:
    return MtpDrafter(ctx.target)


def _auto_factory(ctx: DraftContext) -> Drafter:
    model: ModelDrafter | MtpDrafter | None = None
    if ctx.draft_model:
        model = _load_draft(ctx)
    elif _mtp_support(ctx.target)[0]:
        model = MtpDrafter(ctx.target)
    return AutoDrafter(NgramDrafter(ctx.ngram_min, ctx.ngram_max), model)


BUILTIN_DRAFTERS: dict[str, DrafterFactory] = {"ngram": _ngram_factory, "draft": _draft_factory,
                                                 "mtp": _mtp_factory}
DRAFTERS.update(BUILTIN_DRAFTERS)


def make_drafter(name: str, ctx: DraftContext) -> Drafter | None:
    """The drafter called ``name`` for one request (None for ``off``).
    Raises DrafterError (bad settings) or DraftModelError (draft model)."""
    check_name(name)
    check_max_draft(ctx.max_draft)
    check_ngram(ctx.ngram_min, ctx.ngram_max)
    if name == "off":
        return None
    if name == "auto":
        return _auto_factory(ctx)
    return DRAFTERS[name](ctx)


# --------------------------------------------------------------------------
# Cost model and calibration (per loaded model)


class CostModel:
    """Measured cost of a plain one-token step (seconds) and of verify batches
    (as a ratio to the plain step measured at the same time, so a machine
    whose load changes keeps sensible figures), and the largest batch whose
    logits equal one-token decoding bit for bit."""

    def __init__(self) -> None:
        self.step: float | None = None
        self.ratios: dict[int, list[float]] = {}  # batch size -> [ratio EMA, observations]
        self.exact_batch: int | None = None  # None: not calibrated
        self.calibrated_to = 0  # largest batch size calibration tested
        self._fit: tuple[float, float] | None = None

    def observe_step(self, dt: float) -> None:
        if self.step is None:
            self.step = dt
        else:  # one slow step (another process, a page fault) is not the new normal
            self.step = 0.8 * self.step + 0.2 * min(dt, 3 * self.step)

    def observe_verify(self, n: int, dt: float) -> None:
        r = min(max(dt / self.step_cost(), 0.5), 3.0 * n)
        have = self.ratios.get(n)
        if have is None:
            self.ratios[n] = [r, 1.0]
        else:
            # Geometric mean, each observation moving it by at most 25%: one
            # step that another process slowed down must not decide the next ones.
            move = min(max(0.3 * math.log(r / have[0]), -0.22), 0.22)
            have[0] *= math.exp(move)
            have[1] += 1
        self._fit = None

    def step_cost(self) -> float:
        return self.step if self.step is not None else 0.012

    @property
    def verify(self) -> dict[int, float]:
        """Estimated seconds per batch size that has been measured."""
        return {n: self.verify_cost(n) for n in sorted(self.ratios)}

    def _line(self) -> tuple[float, float]:
        """ratio(n) = 1 + b (n - 1): a batch of one token is a plain step; b is
        the least-squares slope over the measured sizes (a free intercept
        lets noise in the small sizes make short drafts look cheap)."""
        if self._fit is None:
            pts = [(n - 1, r, min(c, 10.0)) for n, (r, c) in self.ratios.items() if n > 1]
            if not pts:
                b = 0.55  # DESIGN.md's figures for this kind of CPU
            else:
                b = sum(w * x * (r - 1.0) for x, r, w in pts) / sum(w * x * x for x, _, w in pts)
            self._fit = (1.0, min(max(b, 0.05), 2.0))
        return self._fit

    def verify_cost(self, n: int) -> float:
        """Estimated seconds to verify a batch of ``n`` tokens (logits for all)."""
        if n <= 1:
            return self.step_cost()
        a, b = self._line()
        return self.step_cost() * max(1.0, a + b * (n - 1))


_COSTS: "weakref.WeakKeyDictionary[Backend, CostModel]" = weakref.WeakKeyDictionary()


def cost_model(backend: Backend) -> CostModel:
    """The cost model of one loaded model (kept as long as the backend lives)."""
    cm = _COSTS.get(backend)
    if cm is None or getattr(cm, "_path", None) != _model_key(backend):
        cm = CostModel()
        cm._path = _model_key(backend)  # a reload with another model starts afresh
        _COSTS[backend] = cm
    return cm


def _model_key(backend: Backend) -> tuple:
    try:
        info = backend.info
    except Exception:  # noqa: BLE001
        return ()
    return (info.path, info.context_length, info.n_threads)


def rollback(backend: Backend, n: int, tokens: Sequence[int]) -> None:
    """Cut the cache back to ``n`` tokens; where the backend could not cut
    there (and cleared more), evaluate ``tokens[len(cache):n]`` again."""
    backend.truncate(n)
    have = len(backend.cached_tokens)
    if have < n:
        backend.forward(list(tokens[have:n]))


# Calibration probes at least this far into the context: llama.cpp's CPU flash
# attention changes how it computes a one-token step once the KV cache holds
# 512 cells (more than 256 tokens), so a probe at the start of a short prompt
# would say "exact" where long contexts are not. Just past that point: the
# padding is most of calibration's cost (SmolLM2-135M, 2 cores, a 231-token
# prompt: 1.0 s at 320, 2.5 s at 600; both find the same limits).
CALIBRATION_CONTEXT = 320


# Calibration results are kept on disk (the user cache dir), keyed by what
# decides them: the model file, the backend and its library version, the load
# choices (KV cache type, threads, context) and the CPU. The first request
# that drafts on a model then skips the ~2 s measurement on every later start.
_BACKEND_DISTS = {"llama.cpp": "llama-cpp-python", "mlx": "mlx"}


def _calibration_key(backend: Backend) -> str | None:
    import hashlib
    import importlib.metadata

    from assistant.machine.hardware import probe as probe_machine

    try:
        info = backend.info
        path = Path(info.path)
        st = path.stat()
        version = importlib.metadata.version(_BACKEND_DISTS[info.backend])
    except (AttributeError, KeyError, OSError, TypeError, ValueError, importlib.metadata.PackageNotFoundError):
        return None  # a backend we cannot identify (tests' fakes, plugins): measure every time
    machine = probe_machine()
    parts = [info.backend, version, str(path.resolve()), str(st.st_size), str(st.st_mtime_ns),
             str(info.context_length), str(info.n_threads), str(info.choices.get("kv_cache")),
             str(info.choices.get("flash_attn")), machine.platform_tag, str(machine.cpu_model)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _calibration_file() -> Path:
    from assistant.paths import cache_dir

    return cache_dir() / "speculative-calibration.json"


def _load_calibration(backend: Backend, cm: CostModel, max_batch: int) -> bool:
    import json

    key = _calibration_key(backend)
    if key is None:
        return False
    try:
        entry = json.loads(_calibration_file().read_text()).get(key)
        exact, upto = int(entry["exact_batch"]), int(entry["calibrated_to"])
        ratios = {int(n): float(r) for n, r in entry["ratios"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    if exact < upto or upto >= max_batch:  # the limit was found, or as far as needed was tried
        cm.exact_batch, cm.calibrated_to = exact, upto
        cm.ratios = {n: [r, 1.0] for n, r in ratios.items()}
        cm._fit = None
        if cm.step is None and entry.get("step"):
            cm.step = float(entry["step"])  # a starting value; plain steps refresh it
        return True
    return False


def _save_calibration(backend: Backend, cm: CostModel) -> None:
    import json
    import os

    key = _calibration_key(backend)
    if key is None or cm.exact_batch is None:
        return
    path = _calibration_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"model": str(backend.info.path), "exact_batch": cm.exact_batch, "calibrated_to": cm.calibrated_to,
                 "ratios": {str(n): round(r, 4) for n, (r, _) in cm.ratios.items()}, "step": cm.step,
                 "saved": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: two daemons never leave half a file
    except OSError:
        pass  # a read-only cache dir costs a calibration per start, nothing else


def calibrate(backend: Backend, probe: Sequence[int], max_batch: int) -> CostModel:
    """Measure the largest verify batch (up to ``max_batch``) whose logits equal
    one-token steps bit for bit, and seed the cost model with the timings.
    The cache is left as it was.

    The test runs after the current cache, padded with ``probe`` tokens to at
    least ``CALIBRATION_CONTEXT`` tokens where the window allows (the text does
    not matter; the request's own tokens are realistic). Sizes tried: 2, 4,
    8, ... up to ``max_batch``, then a binary search between the last exact
    and the first inexact size. Costs about ``max_batch`` one-token steps, as
    many batched tokens again and the padding (about a second for
    SmolLM2-135M on 2 cores), once per model file and machine: the result is
    kept in the user cache dir (see ``_calibration_key``)."""
    cm = cost_model(backend)
    n0 = len(backend.cached_tokens)
    n_ctx = backend.info.context_length
    max_batch = min(max_batch, MAX_DRAFT_LIMIT + 1, n_ctx - n0)
    if cm.exact_batch is not None and (cm.exact_batch < cm.calibrated_to or cm.calibrated_to >= max_batch):
        return cm
    if max_batch < 2 or not probe:
        return cm
    if cm.exact_batch is None and _load_calibration(backend, cm, max_batch):
        return cm
    probe = [int(t) for t in probe]
    base = list(backend.cached_tokens)
    at = max(n0, min(CALIBRATION_CONTEXT, n_ctx - max_batch))
    fill = [probe[i % len(probe)] for i in range(at - n0)]
    here = base + fill
    toks = [probe[(i * 7 + 3) % len(probe)] for i in range(max_batch)]
    try:
        if fill:
            backend.forward(fill)
        ref, times = [], []
        for t in toks:
            t0 = time.perf_counter()
            ref.append(backend.forward((t,))[0])
            times.append(time.perf_counter() - t0)
        ref = np.stack(ref)
        cm.step = float(np.median(times))  # the median: robust to a busy moment

        def exact(n: int) -> bool:
            rollback(backend, at, here)
            t0 = time.perf_counter()
            rows = backend.forward(toks[:n], logits_at=list(range(n)))
            cm.observe_verify(n, time.perf_counter() - t0)
            return bool(np.array_equal(rows, ref[:n]))

        good, bad = 1, None
        n = 2
        while True:
            if exact(n):
                good = n
            else:
                bad = n
                break
            if n >= max_batch:
                break
            n = min(2 * n, max_batch)
        if bad is not None:
            while bad - good > 1:
                mid = (good + bad) // 2
                if exact(mid):
                    good = mid
                else:
                    bad = mid
    finally:
        rollback(backend, n0, base)
    cm.exact_batch = good
    cm.calibrated_to = max_batch if bad is None else bad
    _save_calibration(backend, cm)
    return cm


# --------------------------------------------------------------------------
# The controller


# Prior acceptance per class: (accepted, tried) pseudo-counts.
_PRIORS = {
    "ngram:16+": (4.9, 5.0),
    "ngram:8+": (4.5, 5.0),
    "ngram:5+": (3.0, 5.0),
    "ngram:4": (2.5, 5.0),
    "ngram:3": (2.0, 5.0),
    "ngram:2": (1.5, 5.0),
    "ngram:1": (1.0, 5.0),
    "draft": (3.0, 5.0),
    "mtp": (3.0, 5.0),
}
_DECAY = 0.9  # old evidence fades: recent drafts count most
_MEMORY = 20.0  # at most this many tried tokens of evidence per class
PAUSE_START, PAUSE_MAX = 32, 1024
PROBE_DRAFT = 4  # tokens drafted to probe a switched-off class


class Controller:
    """Picks the draft length from measured acceptance and cost; pauses
    drafting for the request when recent verify steps did not pay."""

    def __init__(self, cost: CostModel, max_draft: int, token_cost: Callable[[str], float]):
        self.cost = cost
        self.max_draft = max_draft
        self.token_cost = token_cost  # class -> seconds per drafted token (0: free, as prompt lookup)
        self.stats: dict[str, list[float]] = {}
        self.room = 0  # set by the engine before each proposal
        self.window: list[tuple[float, float]] = []  # (tokens gained * plain step, seconds)
        self.paused_until = -1
        self.pause = PAUSE_START
        self.pauses = 0
        self.position = 0  # tokens so far (set by the engine with room)
        self.probe: dict[str, list[int]] = {}  # switched-off class -> [next probe position, interval]
        self.probes = 0

    def alpha(self, cls: str) -> float:
        s = self.stats.get(cls)
        if s is None:
            a, n = _PRIORS.get(cls, (2.0, 5.0))
        else:
            a, n = s
        return min(a / n, 0.995)

    def record(self, cls: str, drafted: int, accepted: int) -> None:
        s = self.stats.get(cls)
        if s is None:
            s = list(_PRIORS.get(cls, (2.0, 5.0)))
            self.stats[cls] = s
        tried = accepted + (1 if accepted < drafted else 0)
        s[0] = s[0] * _DECAY ** tried + accepted
        s[1] = s[1] * _DECAY ** tried + tried
        if s[1] > _MEMORY:  # a long accepted draft must not outweigh the next miss
            s[0] *= _MEMORY / s[1]
            s[1] = _MEMORY
        if cls in self.probe and accepted == drafted:
            # A switched-off class drafted right again: start it afresh from the prior.
            del self.probe[cls]
            del self.stats[cls]

    def choose(self, cls: str, available: int) -> int:
        k_max = min(available, self.room, self.max_draft)
        if k_max <= 0:
            return 0
        k = self._best(cls, k_max)
        if k > 0:
            return k
        if cls not in self.stats and self.alpha(cls) < 0.8:
            return 0  # never drafted and not promising: nothing to learn
        # This class drafted before and stopped paying (or should pay but the
        # measured costs say no: they may be stale): probe it now and then
        # (after 32 tokens, then 64, 128, ... up to 1024).
        probe = self.probe.get(cls)
        if probe is None:
            self.probe[cls] = [self.position + PAUSE_START, PAUSE_START]
            return 0
        if self.position < probe[0]:
            return 0
        probe[1] = min(2 * probe[1], PAUSE_MAX)
        probe[0] = self.position + probe[1]
        self.probes += 1
        return min(k_max, PROBE_DRAFT)

    def _best(self, cls: str, k_max: int) -> int:
        a = self.alpha(cls)
        c1 = self.cost.step_cost()
        extra = self.token_cost(cls)
        best_k, best = 0, 1.03  # drafting must beat plain decoding by a margin
        expected = 1.0
        power = 1.0
        for k in range(1, k_max + 1):
            power *= a
            expected += power  # 1 + a + ... + a^k: tokens per verify step
            gain = expected * c1 / (self.cost.verify_cost(k + 1) + k * extra)
            if gain >= best * 0.995 and (best_k or gain > best):  # near-ties go to the longer draft
                best_k, best = k, max(gain, best)
            if power < 0.02:
                break
        return best_k

    def verified(self, produced: int, seconds: float, position: int) -> None:
        """One verify step produced ``produced`` tokens in ``seconds`` (drafting included)."""
        w = self.window
        w.append((produced * self.cost.step_cost(), seconds))
        if len(w) > 8:
            del w[0]
        if len(w) >= 6:
            gained = sum(x for x, _ in w) / sum(s for _, s in w)
            if gained < 0.9:
                self.paused_until = position + self.pause
                self.pause = min(2 * self.pause, PAUSE_MAX)
                self.pauses += 1
                w.clear()
            elif gained > 1.2:
                self.pause = PAUSE_START


# --------------------------------------------------------------------------
# The engine


class SpeculativeEngine:
    """Runs the decode loop of one request with a drafter (see module doc).

    ``exact``: keep each verify batch within the size where the backend's
    batched logits equal one-token decoding (measured by :func:`calibrate`),
    so greedy output is identical to plain decoding. ``adaptive=False``
    drafts ``max_draft`` tokens whenever the drafter has any (tests)."""

    def __init__(self, drafter: Drafter, *, max_draft: int = DEFAULT_MAX_DRAFT, exact: bool = True,
                 adaptive: bool = True):
        self.drafter = drafter
        self.max_draft = check_max_draft(max_draft)
        self.exact = exact
        self.adaptive = adaptive
        self.stats: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.drafter.name

    def decode(self, backend: Backend, logits: np.ndarray, sampler: Sampler, history: list[int],
               push: Callable[[int], str | None], *, max_tokens: int, cancel: threading.Event | None = None,
               eog: Sequence[int] = ()) -> tuple[str, bool]:
        """The decode loop after prefill. ``logits`` is the last prompt
        position's row, ``history`` the prompt tokens (``push`` appends each
        emitted token to it), ``push(token)`` emits a token and returns a
        finish reason ("stop", "length") or None to go on. Returns
        (finish_reason, context_full); the figures go to ``self.stats``."""
        cost = cost_model(backend)
        drafter = self.drafter
        n_prompt = len(history)
        n_ctx = backend.info.context_length
        params = sampler.params
        drafter_cost = getattr(drafter, "token_cost", None)
        ctl = Controller(cost, self.max_draft,
                         (lambda cls: drafter_cost(cls, cost.step_cost())) if drafter_cost else (lambda cls: 0.0))
        eog = list(eog)
        fast = params.greedy and params.repeat_penalty == 1.0 and not eog
        penalised = params.repeat_penalty != 1.0

        def pick(row: np.ndarray, hist: Sequence[int]) -> int:
            if eog:
                row = row.copy()
                row[eog] = -np.inf
            return sampler.sample(row, hist)

        def calibrated(room: int) -> int:
            """Measure the exact verify batch and the costs now; the room left to draft."""
            calibrate(backend, history[-64:], min(self.max_draft + 1, n_ctx - cache_len))
            return min(room, (cost.exact_batch or 1) - 1) if self.exact else room

        drafted = accepted = verifies = 0
        draft_s = 0.0
        t_verify = 0.0
        cache_len = len(backend.cached_tokens)
        choose = ctl.choose if self.adaptive else (lambda cls, available: min(available, ctl.room, self.max_draft))
        drafter.begin(history, params)
        finish, context_full = "length", False
        tok = pick(logits, history)
        try:
            while True:
                finish = push(tok)
                if finish:
                    break
                if cache_len + 1 > n_ctx:
                    finish, context_full = "length", True
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                n_out = len(history) - n_prompt
                room = min(n_ctx - cache_len - 1, max_tokens - n_out - 1, self.max_draft)
                if self.exact and cost.exact_batch is not None and not self._needs_calibration(cost, room):
                    room = min(room, cost.exact_batch - 1)
                draft = None
                if room > 0 and cost.exact_batch is None and getattr(drafter, "needs_costs", False):
                    # A drafter that costs time (a model) is judged against measured
                    # verify costs from its first proposal: the prior's guess would
                    # refuse a cheap draft model on a machine where batches are cheap.
                    room = calibrated(room)
                if room > 0 and len(history) >= ctl.paused_until:
                    ctl.room = room
                    ctl.position = len(history)
                    draft = drafter.propose(history, choose)
                    if draft and self.exact and self._needs_calibration(cost, room):
                        room = calibrated(room)  # first draft on this model: find the largest exact batch
                if not draft or not draft.tokens or room <= 0:
                    t0 = time.perf_counter()
                    row = backend.forward((tok,))[-1]
                    cost.observe_step(time.perf_counter() - t0)
                    cache_len += 1
                    tok = pick(row, history)
                    continue

                d = draft.tokens[:room]
                k = len(d)
                t0 = time.perf_counter()
                rows = backend.forward([tok, *d], logits_at=list(range(k + 1)))
                dt = time.perf_counter() - t0
                cost.observe_verify(k + 1, dt)
                t_verify += dt
                draft_s += draft.cost_s
                cache_len += k + 1
                verifies += 1

                if fast:
                    preds = rows.argmax(axis=1)
                    m = 0
                    while m < k and preds[m] == d[m]:
                        m += 1
                    nxt = int(preds[m])
                elif draft.q is None:
                    # Point-mass draft: draw the token plain decoding would draw
                    # (same sampler, same random stream) and keep d where they agree.
                    m = 0
                    while True:
                        x = pick(rows[m], history + d[:m] if penalised and m else history)
                        if m < k and x == d[m]:
                            m += 1
                            continue
                        nxt = x
                        break
                else:
                    m, nxt = self._rejection(rows, d, draft.q, sampler, history, eog)
                drafted += k
                accepted += m
                ctl.record(draft.cls, k, m)
                ctl.verified(m + 1, dt + draft.cost_s, len(history) + m + 1)
                for j in range(m):
                    finish = push(d[j])
                    if finish:
                        break
                if m < k:
                    cache_len -= k - m
                    rollback(backend, cache_len, history)
                if finish:
                    break
                tok = nxt
        finally:
            drafter.close()
        if cache_len > len(history):  # drafts beyond a stop are not part of the text
            rollback(backend, len(history), history)
        self.stats = {
            "drafter": self.name,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "speculative": {
                "verify_steps": verifies,
                "verify_ms": round(t_verify * 1000, 1),
                "draft_ms": round(draft_s * 1000, 1),
                "paused": ctl.pauses,
                "probes": ctl.probes,
                "max_draft": self.max_draft,
                "exact_batch": cost.exact_batch if self.exact else None,
            },
        }
        return finish, context_full

    @staticmethod
    def _needs_calibration(cost: CostModel, room: int) -> bool:
        if cost.exact_batch is None:
            return True
        # Exact as far as calibration went, and this request may verify more at once.
        return cost.exact_batch >= cost.calibrated_to and room + 1 > cost.calibrated_to

    @staticmethod
    def _rejection(rows: np.ndarray, d: list[int], q: list[tuple[np.ndarray, np.ndarray]], sampler: Sampler,
                   history: list[int], eog: Sequence[int]) -> tuple[int, int]:
        """Accept d[j] with probability min(1, p/q); on rejection sample from
        norm(max(0, p - q)); after k acceptances sample from the last row.
        Returns (accepted count, next token)."""
        k = len(d)
        for j in range(k + 1):
            row = rows[j]
            if eog:
                row = row.copy()
                row[list(eog)] = -np.inf
            cand, p = sampler.distribution(row, history + d[:j] if sampler.params.repeat_penalty != 1.0 else ())
            if j == k:
                return k, int(cand[sampler.choice(p)]) if len(cand) > 1 else int(cand[0])
            qc, qp = q[j]
            tok = d[j]
            hit_p = np.flatnonzero(cand == tok)
            hit_q = np.flatnonzero(qc == tok)
            pd = float(p[hit_p[0]]) if len(hit_p) else 0.0
            qd = float(qp[hit_q[0]]) if len(hit_q) else 0.0
            if qd > 0 and sampler.rng.random() < min(1.0, pd / qd):
                continue
            ids = np.union1d(cand, qc)
            pp = np.zeros(len(ids))
            qq = np.zeros(len(ids))
            pp[np.searchsorted(ids, cand)] = p
            qq[np.searchsorted(ids, qc)] = qp
            r = np.maximum(pp - qq, 0.0)
            total = r.sum()
            if total <= 0:  # p == q: nothing left over; p itself is the answer
                r, total = pp, pp.sum()
            return j, int(ids[sampler.choice(r / total)])
        raise AssertionError("unreachable")
