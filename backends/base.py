"""The interface every inference backend implements.

A backend owns one loaded model and its KV cache (a single sequence). It is
driven from exactly one worker thread (see ``assistant.daemon.worker``), so
implementations need no locking of their own.

The generation loop, the sampler and the speculative-decoding engine all live
in ``assistant/`` and are shared by every backend: a backend only has to turn
tokens into logits (``forward``), roll its cache back (``truncate``) and speak
its model's tokenizer and chat template.
"""

from __future__ import annotations

import abc
import codecs
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

if TYPE_CHECKING:
    from backends.media import MediaInput, MediaPrompt, MediaSpan


class BackendError(Exception):
    """Base class of errors a backend raises with a message meant for users."""


class BackendUnavailable(BackendError):
    """The backend's library is not installed or cannot run on this machine."""


class ModelLoadError(BackendError):
    """The model file is missing, unreadable, corrupt or of an unsupported kind."""


class EmbeddingsUnsupported(BackendError):
    """This backend (or model) cannot compute embeddings (``Backend.embed``)."""


class MediaError(BackendError):
    """A medium (image, audio) the model cannot read: a kind it does not take, a
    file its decoder refuses, a projector that does not fit the model."""


class ContextOverflowError(BackendError):
    """More tokens were asked for than the model's context window holds."""

    def __init__(self, message: str, *, needed: int, available: int):
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class MachineFigures:
    """What a backend needs to know about the machine to size threads and context.

    Plain numbers, so a backend needs no probe of its own: the daemon passes
    the figures it measured (``assistant.machine.hardware.figures``), and a
    backend used alone measures them with ``backends.sizing.measure``. None
    where a figure is unknown."""

    physical_cores: int | None  # usable by this process (affinity, cgroup quota)
    logical_cores: int
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    # Apple Silicon's performance cores; decoding on efficiency cores too is slower.
    performance_cores: int | None = None


@dataclass
class LoadOptions:
    """How to load a model. ``None`` means: let the backend pick from the machine."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_batch: int | None = None
    chat_template: str | None = None  # overrides the template in the model file
    extra: dict[str, Any] = field(default_factory=dict)
    # The machine threads and context are sized for; None: the backend measures it (``backends.sizing``).
    machine: MachineFigures | None = None
    # A separate MTP drafter model (Gemma 4's gemma4-assistant) loaded beside the target and
    # paired with it; None: only the model's own NextN layers, if any (``mtp_support``).
    # A drafter that does not pair is refused (ModelLoadError) before anything loads.
    mtp_model: str | None = None
    # A multimodal projector (llama.cpp's mmproj-*.gguf) for images and audio read natively;
    # None: a ``mmproj-*.gguf`` beside the model that pairs with it, if any (``media_support``).
    mmproj: str | None = None


MTP_KINDS = ("nextn", "assistant")  # what ``Backend.mtp_kind`` returns (or None)


@dataclass(frozen=True)
class MtpPairing:
    """Whether a separate MTP drafter model pairs with a target model, checked
    from headers/config files alone (nothing loaded). ``differences`` names
    each mismatch ("architecture llama, expected gemma4-assistant", ...);
    ``ok`` is True when there is none. Backends and ``doctor`` share it."""

    drafter: str  # the drafter's path
    target: str  # the target's path
    differences: tuple[str, ...] = ()
    kind: str = "assistant"

    @property
    def ok(self) -> bool:
        return not self.differences

    def why(self) -> str:
        """One sentence: why it pairs, or every reason it does not."""
        if self.ok:
            return f"{self.drafter} pairs with {self.target}"
        return f"{self.drafter} does not pair with {self.target}: " + "; ".join(self.differences)


@dataclass
class ModelInfo:
    """What a loaded model is. Sent to clients as-is by ``models.list``."""

    name: str
    path: str
    backend: str
    architecture: str
    context_length: int  # the context window in use (n_ctx)
    train_context_length: int  # what the model was trained for
    vocab_size: int
    chat_template: str | None
    template_source: str  # "model" | "config" | "fallback"
    bos_token_id: int | None
    eos_token_ids: list[int]
    modalities: list[str] = field(default_factory=lambda: ["text"])
    size_bytes: int = 0
    quantization: str | None = None
    n_threads: int = 0
    n_params: int | None = None
    choices: dict[str, str] = field(default_factory=dict)  # setting -> why it was picked

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("chat_template", None)  # large; clients ask for it explicitly
        return data


class Backend(abc.ABC):
    """One loaded model behind a common interface.

    Token positions: the KV cache holds ``cached_tokens``; ``forward`` appends
    to it, ``truncate`` cuts it back. Callers that want to reuse a prefix
    compare their prompt with ``cached_tokens``, ``truncate`` to the common
    prefix and ``forward`` the rest.
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and a human reason either way."""

    @classmethod
    def check_model(cls, path: str) -> None:
        """Raise ``ModelLoadError`` if this backend surely cannot load ``path``.

        Cheap (headers and small files, never weights): the daemon asks before
        it unloads anything, so a load bound to fail leaves the loaded models
        in place. The default checks nothing."""

    @abc.abstractmethod
    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        """Load the model at ``path``. Raises ``ModelLoadError`` with a clear message."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the model and its cache. Safe to call twice."""

    # Set by ``load`` (None while nothing is loaded); ``info`` hands it out.
    _info: ModelInfo | None = None

    @property
    def info(self) -> ModelInfo:
        """The loaded model's facts and load-time choices; BackendError when none is loaded.
        A backend sets ``self._info`` in ``load`` (or overrides this property)."""
        if self._info is None:
            raise BackendError("no model is loaded")
        return self._info

    # -- tokenizer -----------------------------------------------------------

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to token ids. ``special`` parses control tokens written in the text."""

    @abc.abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character)."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text, replacing invalid UTF-8."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    @abc.abstractmethod
    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end-of-turn)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (or the fallback)."""

    # -- the two primitives generation and speculative decoding are built on --

    @property
    @abc.abstractmethod
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the cache, in order."""

    @abc.abstractmethod
    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        """Append ``tokens`` to the cache and return logits.

        ``logits_at`` are indices into ``tokens`` (default: only the last one).
        Returns a float32 array of shape ``(len(logits_at), vocab_size)``; row i
        is the distribution of the token that follows ``tokens[logits_at[i]]``.
        Only the asked-for rows are computed and copied. Raises
        ``ContextOverflowError`` if the cache would exceed the context window.
        """

    @abc.abstractmethod
    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` cached tokens."""

    # -- optional: multi-token prediction (the ``mtp`` drafter) ----------------

    def mtp_support(self) -> tuple[bool, str]:
        """(True, what) when :meth:`mtp_draft` works for the loaded model,
        else (False, why not). The default: this backend has none."""
        return False, f"the {self.name} backend has no multi-token-prediction support"

    def mtp_kind(self) -> str | None:
        """Which multi-token-prediction drafter :meth:`mtp_draft` runs: ``"nextn"``
        (the model's own NextN layers), ``"assistant"`` (a separate drafter model
        paired with it, ``LoadOptions.mtp_model`` or a sibling ``mtp-*.gguf``),
        or None when there is none. Stats carry it beside ``drafter: mtp``."""
        return None

    def mtp_draft(self, tokens: Sequence[int], n: int) -> list[int]:
        """Up to ``n`` greedy guesses of the tokens after ``tokens`` from the
        model's multi-token-prediction drafter (its own NextN layers, or the
        paired assistant model: :meth:`mtp_kind`). ``tokens`` is the
        cache plus one token not yet evaluated (the engine's state between
        steps); [] where nothing can be drafted. The cache is left as it was."""
        raise BackendError(self.mtp_support()[1])

    # -- optional: media read natively (images, audio; see backends/media.py) ------

    def media_support(self) -> frozenset[str]:
        """The media kinds ("image", "audio") the loaded model reads itself. The
        default: none (the daemon falls back to OCR / transcription skills)."""
        return frozenset()

    def media_marker(self) -> str:
        """The text the daemon writes into a message where a medium goes, one per
        medium, before the chat template renders it (llama.cpp's mtmd marker)."""
        return "<__media__>"

    def tokenize_media(self, text: str, media: Sequence["MediaInput"]) -> "MediaPrompt":
        """The rendered prompt ``text`` (one :meth:`media_marker` per medium, in
        order) and its ``media`` as a ``MediaPrompt``: text tokens, and a span of
        placeholder ids per medium, as many positions as the model counts for it.
        Raises ``MediaError`` for a medium the model cannot read (a kind it does
        not take, a file its decoder refuses); encoding may be left to
        :meth:`forward_media`."""
        raise MediaError(f"the {self.name} backend reads no media natively")

    def forward_media(self, span: "MediaSpan") -> None:
        """Append one medium (a span of :meth:`tokenize_media`'s prompt) to the
        cache at the cache's end; ``cached_tokens`` then ends with its
        placeholders. Sets ``span.encode_ms``. Raises ``ContextOverflowError``
        like :meth:`forward`. No logits: a prompt always ends in text."""
        raise MediaError(f"the {self.name} backend reads no media natively")

    # -- optional: embeddings (the HTTP API's /v1/embeddings) --------------------

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One embedding per text: unit-length (L2-normalised) float vectors of the
        model's embedding size. Raises ``EmbeddingsUnsupported`` where the backend
        has none (the default), ``ContextOverflowError`` for a text too long to embed."""
        raise EmbeddingsUnsupported(f"the {self.name} backend cannot compute embeddings")


class IncrementalDecoder:
    """Turns a stream of token ids into text without splitting UTF-8 characters.

    Bytes of a character split across tokens are held back until the
    character is complete.
    """

    def __init__(self, backend: Backend):
        self._backend = backend
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._backend.token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
