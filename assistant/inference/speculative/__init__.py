"""Speculative decoding: one engine over ``Backend.forward`` + ``Backend.truncate``.

A *drafter* guesses the next few tokens cheaply; the target model checks all
of them in one ``forward`` (logits only at the verified positions), keeps the
longest correct prefix plus one token of its own, and ``truncate`` drops the
rest from the KV cache. Any backend with ``forward`` and ``truncate`` (llama.cpp,
MLX, a plugin's) gets it for free.

The modules, one concern each:

- ``drafter``: what a drafter is: the :class:`Drafter` protocol, :class:`Draft`,
  :class:`DraftContext` (what a factory gets), :class:`DrafterError` /
  :class:`DraftModelError`, and the checks of the shared settings.
- ``ngram``: prompt lookup (:class:`NgramDrafter`). An index of every n-gram
  (``ngram_min`` .. ``ngram_max`` tokens) of the prompt, the conversation
  history (it is part of the prompt) and the text generated so far; when the
  last tokens were seen before, the tokens that followed them are the draft.
- ``model``: a second, smaller model with the same tokenizer
  (:class:`ModelDrafter`); :func:`check_draft_pair` refuses a pair whose
  vocabulary, special tokens or token texts differ. The caller loads the
  draft model and passes it in ``DraftContext.draft``.
- ``mtp``: the target model's own multi-token-prediction (NextN) layers
  (:class:`MtpDrafter`), through the backend's ``mtp_draft``; a model
  without such layers is refused naming the model and why.
- ``auto``: prompt lookup where the answer copies from its input (long
  n-gram matches), else the draft model when one is given, else the model's
  MTP layers when it has them (:class:`AutoDrafter`).
- ``registry``: drafters by name (:class:`DrafterRegistry`; the built-ins in
  :data:`BUILTIN_DRAFTERS`, which the core plugin registers through the
  ``register_drafters`` hook like any plugin's drafters).
- ``costs``: :class:`CostModel`, what a plain step and a verify batch cost on
  one loaded model.
- ``calibration``: :func:`calibrate`, the largest verify batch that is
  bit-exact, and :class:`CalibrationStore`, which keeps it on disk.
- ``controller``: :class:`Controller`, the draft length and when to pause.
- ``engine``: :class:`SpeculativeEngine`, the decode loop, a token generator.
- ``cache``: :func:`rollback`, cutting the KV cache back.

Correctness:

- Greedy: a draft token is kept only if it is the token plain decoding would
  have picked from the same logits. That makes the output identical to plain
  decoding *if* the backend computes a verified row exactly as it computes a
  one-token step. llama.cpp does so only up to a batch size that depends on
  the model's tensor types and the CPU (see :func:`calibrate`, and the
  figures in tests/test_speculative.py): the engine measures that size once
  per model file and machine (kept by a :class:`CalibrationStore`) and never
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

This package imports only ``backends.base``, numpy, the standard library and
the rest of ``assistant.inference``: where calibration is kept and which
draft model to use are the caller's to say.
"""

from assistant.inference.speculative.auto import AutoDrafter
from assistant.inference.speculative.cache import rollback
from assistant.inference.speculative.calibration import (CALIBRATION_CONTEXT, CALIBRATION_FILE, DRAFTING_KV_TYPE,
                                                         CalibrationStore, calibrate)
from assistant.inference.speculative.controller import PAUSE_MAX, PAUSE_START, PROBE_DRAFT, Controller
from assistant.inference.speculative.costs import CostModel
from assistant.inference.speculative.drafter import (DEFAULT_MAX_DRAFT, DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN,
                                                     MAX_DRAFT_LIMIT, MODES, Chooser, Draft, DraftContext, Drafter,
                                                     DrafterError, DrafterFactory, DraftModelError, check_max_draft,
                                                     check_ngram)
from assistant.inference.speculative.engine import SpeculativeEngine
from assistant.inference.speculative.model import ModelDrafter, check_draft_pair
from assistant.inference.speculative.mtp import MtpDrafter
from assistant.inference.speculative.ngram import NgramDrafter
from assistant.inference.speculative.registry import BUILTIN_DRAFTERS, DrafterRegistry

__all__ = [
    "AutoDrafter", "BUILTIN_DRAFTERS", "CALIBRATION_CONTEXT", "CALIBRATION_FILE", "CalibrationStore", "Chooser",
    "Controller", "CostModel", "DEFAULT_MAX_DRAFT", "DEFAULT_NGRAM_MAX", "DRAFTING_KV_TYPE", "DEFAULT_NGRAM_MIN", "Draft",
    "DraftContext", "DraftModelError", "Drafter", "DrafterError", "DrafterFactory", "DrafterRegistry",
    "MAX_DRAFT_LIMIT", "MODES", "ModelDrafter", "MtpDrafter", "NgramDrafter", "PAUSE_MAX", "PAUSE_START",
    "PROBE_DRAFT", "SpeculativeEngine", "calibrate", "check_draft_pair", "check_max_draft", "check_ngram",
    "rollback",
]
