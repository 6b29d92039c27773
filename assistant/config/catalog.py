"""The built-in catalog of models `assistant models pull NAME` knows by name.

Each entry names a Hugging Face repository and the files in it: the model
file and, where published, its companions: the ``mtp-`` drafter (Gemma 4's
separate ``gemma4-assistant`` MTP model) and the ``mmproj-`` media projector.
They are fetched from ``{endpoint}/{repo}/resolve/{revision}/{path}``; the
endpoint is ``$ASSISTANT_HF_ENDPOINT``, else ``$HF_ENDPOINT`` (the variable
huggingface_hub reads), else https://huggingface.co, so a mirror (or a test's
local server) can stand in for the hub.

Where the checksum below is given it was published by two sources that
agree (the publisher's file listing as copied by independent projects); the
download is refused when the file's sha256 differs. Where it is ``None`` the
download is checked against the digest the hub publishes with the file (the
``X-Linked-ETag`` header of LFS files): those files have been re-uploaded
under the same name with new contents, so a pin written here would go stale.

Names checked (2026, through code and model cards that use them; no hub is
reachable where this was written): every repository and file below appears
in at least two independent sources, except where a comment says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_ENDPOINT = "https://huggingface.co"

ROLES = ("model", "mtp", "mmproj")


def hf_endpoint() -> str:
    """The hub's base URL: $ASSISTANT_HF_ENDPOINT, then $HF_ENDPOINT, then huggingface.co."""
    for var in ("ASSISTANT_HF_ENDPOINT", "HF_ENDPOINT"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.rstrip("/")
    return DEFAULT_ENDPOINT


def hf_url(repo: str, path: str, revision: str = "main") -> str:
    """The download URL of ``path`` in the model repository ``repo``."""
    return f"{hf_endpoint()}/{repo}/resolve/{revision}/{path}"


@dataclass(frozen=True)
class CatalogFile:
    """One file of a catalog entry: where it is in which repository, and what it is."""

    role: str  # "model", "mtp" (the MTP drafter) or "mmproj" (the media projector)
    repo: str
    path: str  # inside the repository; its last part is the name it gets on disk
    size: int | None = None  # bytes, as published (for the disk-space check before anything is written)
    sha256: str | None = None  # see the module docstring

    @property
    def url(self) -> str:
        return hf_url(self.repo, self.path)

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CatalogEntry:
    """A model `assistant models pull NAME` knows: its files and a line about it."""

    name: str
    description: str
    files: tuple[CatalogFile, ...] = field(default_factory=tuple)

    @property
    def model(self) -> CatalogFile:
        return next(f for f in self.files if f.role == "model")

    @property
    def companions(self) -> tuple[CatalogFile, ...]:
        return tuple(f for f in self.files if f.role != "model")


_UNSLOTH_12B = "unsloth/gemma-4-12b-it-GGUF"
_GOOGLE_12B_QAT = "google/gemma-4-12B-it-qat-q4_0-gguf"
_UNSLOTH_12B_QAT = "unsloth/gemma-4-12B-it-qat-GGUF"
_GGML_12B = "ggml-org/gemma-4-12B-it-GGUF"
_GGML_E4B = "ggml-org/gemma-4-E4B-it-GGUF"
_GGML_E2B = "ggml-org/gemma-4-E2B-it-GGUF"

_ENTRIES = (
    CatalogEntry(
        "gemma4-12b",
        "Gemma 4 12B instruct, Q4_K_M (about 7.1 GB), with its MTP drafter (Q8_0) and media projector (F16)",
        (
            # Size from one source only; the file was re-uploaded (three different sha256s are quoted
            # for this name), so it is checked against the hub's published digest.
            CatalogFile("model", _UNSLOTH_12B, "gemma-4-12b-it-Q4_K_M.gguf", 7_121_861_440),
            # Unsloth publishes the drafter under MTP/ (Q8_0, BF16, F16) and mirrors the Q8_0 at the
            # repository root as mtp-gemma-4-12b-it.gguf; both names are quoted with this digest.
            CatalogFile("mtp", _UNSLOTH_12B, "MTP/mtp-gemma-4-12b-it-Q8_0.gguf", 465_109_248,
                        "145db9094bc0f85f1701e255a2ed216dcc9800fc8bc8631ad00905b456bd451b"),
            CatalogFile("mmproj", _UNSLOTH_12B, "mmproj-F16.gguf", 175_115_840,
                        "91f086971e56d7a7d8d39e271873fccdb49541bd259d6e02c401a4f1cb7a219e"),
        ),
    ),
    CatalogEntry(
        "gemma4-12b-qat",
        "Gemma 4 12B instruct, Google's quantization-aware Q4_0 (about 7.0 GB), with the QAT-matched "
        "MTP drafter and the projector",
        (
            # Google's repository holds exactly these two files (lower-case "12b" in the file names).
            CatalogFile("model", _GOOGLE_12B_QAT, "gemma-4-12b-it-qat-q4_0.gguf", 6_975_877_728),
            # Google publishes no GGUF drafter; Unsloth's QAT repository has a Q4_0 one at its root
            # (this file name is spelled out by one source; others mention the root drafter).
            CatalogFile("mtp", _UNSLOTH_12B_QAT, "mtp-gemma-4-12B-it.gguf"),
            # The projector's size is quoted by one source.
            CatalogFile("mmproj", _GOOGLE_12B_QAT, "mmproj-gemma-4-12b-it-qat-q4_0.gguf", 175_115_264),
        ),
    ),
    CatalogEntry(
        "gemma4-12b-ggml",
        "Gemma 4 12B instruct, Q4_K_M from ggml-org (llama.cpp's own conversions), with the projector (Q8_0)",
        (
            CatalogFile("model", _GGML_12B, "gemma-4-12B-it-Q4_K_M.gguf"),
            # Only one source names this projector file. No drafter is listed: ggml-org publishes
            # mtp-gemma-4-E2B/E4B-it-Q8_0.gguf beside its small models, but no source confirms the 12B
            # repository's drafter name; pull it with --mtp URL, or use gemma4-12b.
            CatalogFile("mmproj", _GGML_12B, "mmproj-gemma-4-12B-it-Q8_0.gguf"),
        ),
    ),
    CatalogEntry(
        "gemma4-e4b",
        "Gemma 4 E4B instruct (4B effective), Q4_0 (about 4.6 GB), with its MTP drafter and projector (Q8_0)",
        (
            # Q4_0, not Q4_K_M: sources disagree on the case of the Q4_K_M file's name in this repository.
            CatalogFile("model", _GGML_E4B, "gemma-4-E4B-it-Q4_0.gguf"),
            CatalogFile("mtp", _GGML_E4B, "mtp-gemma-4-E4B-it-Q8_0.gguf", 98_653_280,
                        "f38ae62962657c7a6303c49bbb147e9ae23634e911cfa532fac0818c2e18b665"),
            CatalogFile("mmproj", _GGML_E4B, "mmproj-gemma-4-E4B-it-Q8_0.gguf", 559_874_816,
                        "197f49a93027f9843772bd24a6a9e0be2a32a788de5a3def330e9c585d86edd1"),
        ),
    ),
    CatalogEntry(
        "gemma4-e2b",
        "Gemma 4 E2B instruct (2B effective), Q4_0 (about 2.8 GB), with its MTP drafter and projector (Q8_0)",
        (
            CatalogFile("model", _GGML_E2B, "gemma-4-E2B-it-Q4_0.gguf"),
            # The drafter's digest is quoted by one source only (it equalled the hub's X-Linked-ETag
            # there), so it is left to the hub's digest here.
            CatalogFile("mtp", _GGML_E2B, "mtp-gemma-4-E2B-it-Q8_0.gguf", 97_817_696),
            CatalogFile("mmproj", _GGML_E2B, "mmproj-gemma-4-E2B-it-Q8_0.gguf", 557_368_064,
                        "9406f99c16d68cda4f1f0552192dcc99021ea1fc6d2fd50b1dc3ccf30d04b292"),
        ),
    ),
)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}


def catalog_entry(name: str) -> CatalogEntry | None:
    """The catalog entry called ``name`` (case-insensitive), or None."""
    return CATALOG.get(name.strip().lower())
