"""Images and audio through libmtmd (llama.cpp's multimodal library): the
projector's context over a loaded model, media files into mtmd bitmaps, a
medium into mtmd chunks, and one medium's evaluation into the model's KV cache.

The backend (``backends.llamacpp``) owns one :class:`MediaContext` while a
projector is loaded; the generation loop in ``assistant/`` stays in charge:
``tokenize_media`` turns each medium into a :class:`Tokenized` (the text tokens
mtmd wraps it in, e.g. Gemma 4's ``<|image>`` / ``<image|>``, and the chunks of
the medium itself), ``forward_media`` calls :meth:`MediaContext.evaluate` at the
cache's end. We do not use llama_chat_format's chat handlers: they take images
only and drive their own loop.

Decoding the files is ours, not mtmd's helper's, where that matters:

- images are decoded with Pillow (the first frame of an animation, EXIF
  orientation applied, transparency over white) under Pillow's
  decompression-bomb limit, then handed over as RGB pixels
  (``mtmd_bitmap_init``). mtmd's helper would try stb_image and, failing
  that, start ffmpeg on the bytes as a video: never on a file a client sent;
- audio (WAV, MP3, FLAC: what mtmd's miniaudio decodes) is checked first: the
  format by its magic bytes, a WAV's chunks (a data chunk longer than the file
  is a truncated file; a codec miniaudio does not decode is named), the
  duration a WAV or FLAC header claims against :data:`MAX_AUDIO_SECONDS` (the
  decoder allocates what the header says before reading), then decoded and
  resampled to the projector's rate by the helper, which on audio bytes never
  falls through to anything else.

Each failure is a ``MediaError`` naming the file and what is wrong.

Tokenized media are kept by sha256 (:class:`MediaContext` ``cache``, a few
entries): a session's next turn tokenizes its whole history again, and an
image's preprocessing (decode, resize, normalise) is not redone for it.
"""

from __future__ import annotations

import collections
import ctypes
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BackendError, MediaError, ModelLoadError
from .llamacpp_native import LOG_TAIL, llama_said, mtmd

# A backstop for what a WAV or FLAC header may claim (the daemon's media.max_audio_seconds
# is checked first): miniaudio allocates the decoded samples from the header's length.
MAX_AUDIO_SECONDS = 4 * 3600
# Files larger than this are not read at all (the daemon's media.max_bytes comes first).
MAX_MEDIA_BYTES = 1 << 30
# Tokenized media kept for the next turn; larger ones are not kept.
CACHE_ENTRIES = 8
CACHE_MAX_BITMAP_BYTES = 64 << 20

_CHUNK_TEXT, _CHUNK_IMAGE, _CHUNK_AUDIO = 0, 1, 2

# WAV format tags miniaudio's dr_wav decodes
_WAV_CODECS = {1: "PCM", 2: "MS ADPCM", 3: "IEEE float", 6: "A-law", 7: "mu-law", 0x11: "IMA ADPCM",
               0xFFFE: "extensible"}


class NoRoom(BackendError):
    """llama.cpp found no room in the KV cache for a medium (the backend turns it
    into ContextOverflowError with its figures)."""


@dataclass
class Tokenized:
    """One medium as mtmd tokenized it: ``before`` / ``after`` are the text tokens
    mtmd wraps it in (its begin/end-of-media markers), ``chunks`` the indices in
    ``owner``'s chunk list from its first media chunk to its last (text chunks
    between them, as in tiled images, included), ``n_pos`` the positions they
    take, ``n_tokens`` the embeddings they add."""

    owner: "_Chunks"
    before: list[int]
    chunks: list[int]
    after: list[int]
    n_pos: int
    n_tokens: int
    kind: str


class _Chunks:
    """An ``mtmd_input_chunks`` list, freed with this object (a span that still
    refers to it keeps it alive after the cache lets it go)."""

    def __init__(self, M, ptr, context_id: int):
        self.M, self.ptr, self.context_id = M, ptr, context_id

    def get(self, i: int):
        return self.M.mtmd_input_chunks_get(self.ptr, i)

    def __del__(self):
        ptr, self.ptr = self.ptr, None
        if ptr:
            try:
                self.M.mtmd_input_chunks_free(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


_next_context_id = 0


@dataclass
class MediaContext:
    """libmtmd over one loaded llama model and its projector file (``projector``)."""

    M: Any
    ctx: Any  # mtmd_context *
    projector: Path
    kinds: frozenset[str]
    sample_rate: int | None
    marker: str
    context_id: int
    cache: "collections.OrderedDict[tuple[str, str], Tokenized]" = field(default_factory=collections.OrderedDict)

    @classmethod
    def open(cls, model, projector: Path, *, n_threads: int, use_gpu: bool, flash_attn_type: int | None
             ) -> "MediaContext":
        """The projector's context over the loaded ``model``; ModelLoadError saying what
        libmtmd said when it refuses the file (a projector for another model, a type this
        llama.cpp does not know, a damaged file)."""
        global _next_context_id
        try:
            M = mtmd()
        except BackendError as exc:
            raise ModelLoadError(f"projector {projector}: {exc}") from exc
        params = M.mtmd_context_params_default()
        params.use_gpu = bool(use_gpu)
        params.print_timings = False
        params.n_threads = int(n_threads)
        params.warmup = False  # the first medium allocates its compute buffer; loads stay quick
        if flash_attn_type is not None:
            params.flash_attn_type = int(flash_attn_type)
        LOG_TAIL.clear()
        ctx = M.mtmd_init_from_file(str(projector).encode("utf-8"), model, params)
        if not ctx:
            raise ModelLoadError(f"libmtmd could not load the projector {projector}: "
                                 + (llama_said() or "no reason given"))
        kinds = set()
        if M.mtmd_support_vision(ctx):
            kinds.add("image")
        if M.mtmd_support_audio(ctx):
            kinds.add("audio")
        rate = int(M.mtmd_get_audio_sample_rate(ctx)) if "audio" in kinds else None
        raw = M.mtmd_get_marker(ctx) if hasattr(M, "mtmd_get_marker") else None
        raw = raw or M.mtmd_default_marker()
        marker = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        _next_context_id += 1
        return cls(M, ctx, projector, frozenset(kinds), rate if rate and rate > 0 else None, marker,
                   _next_context_id)

    def describe(self) -> str:
        what = " and ".join(w for k, w in (("image", "images"), ("audio", "audio")) if k in self.kinds) or "nothing"
        rate = f", audio at {self.sample_rate} Hz" if self.sample_rate else ""
        return f"projector {self.projector.name}: reads {what} natively{rate}"

    def free(self) -> None:
        """Free the mtmd context (before the model it was made over)."""
        self.cache.clear()
        ctx, self.ctx = self.ctx, None
        if ctx:
            self.M.mtmd_free(ctx)

    # -- a medium into chunks ---------------------------------------------------

    def tokenize(self, media) -> Tokenized:
        """``media`` (a ``backends.media.MediaInput``) as mtmd's chunks; MediaError
        for a kind the projector does not read or a file that does not decode."""
        if self.ctx is None:
            raise BackendError("the projector is not loaded")
        if media.kind not in self.kinds:
            raise MediaError(f"this model's projector ({self.projector.name}) does not read {media.kind} "
                             f"(it reads: {', '.join(sorted(self.kinds)) or 'nothing'})")
        key = (media.kind, media.sha256)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        bitmap = self._bitmap(media)
        M = self.M
        try:
            n_bytes = int(M.mtmd_bitmap_get_n_bytes(bitmap))
            if n_bytes == 0:
                raise MediaError(f"{_name(media)}: no audio samples in it" if media.kind == "audio"
                                 else f"{_name(media)}: an empty image")
            M.mtmd_bitmap_set_id(bitmap, media.sha256.encode("ascii"))
            tok = self._tokenize_bitmap(bitmap, media)
        finally:
            M.mtmd_bitmap_free(bitmap)
        if n_bytes <= CACHE_MAX_BITMAP_BYTES:
            self.cache[key] = tok
            while len(self.cache) > CACHE_ENTRIES:
                self.cache.popitem(last=False)
        return tok

    def _tokenize_bitmap(self, bitmap, media) -> Tokenized:
        M = self.M
        ptr = M.mtmd_input_chunks_init()
        if not ptr:
            raise BackendError("mtmd_input_chunks_init failed")
        chunks = _Chunks(M, ptr, self.context_id)
        marker = self.marker.encode("utf-8")
        text = M.mtmd_input_text()
        text.text, text.text_len = marker, len(marker)
        text.add_special, text.parse_special = False, True
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        LOG_TAIL.clear()
        rc = M.mtmd_tokenize(self.ctx, ptr, ctypes.byref(text), bitmaps, 1)
        if rc != 0:
            said = llama_said()
            raise MediaError(f"{_name(media)}: libmtmd could not prepare the {media.kind} (code {rc})"
                             + (f": {said}" if said else ""))
        n = int(M.mtmd_input_chunks_size(ptr))
        kinds = [int(M.mtmd_input_chunk_get_type(chunks.get(i))) for i in range(n)]
        media_at = [i for i, k in enumerate(kinds) if k != _CHUNK_TEXT]
        if not media_at:
            raise MediaError(f"{_name(media)}: libmtmd made no {media.kind} tokens of it")
        first, last = media_at[0], media_at[-1]
        before = [t for i in range(first) for t in self._text_tokens(chunks.get(i))]
        after = [t for i in range(last + 1, n) for t in self._text_tokens(chunks.get(i))]
        inner = list(range(first, last + 1))
        n_pos = sum(int(M.mtmd_input_chunk_get_n_pos(chunks.get(i))) for i in inner)
        n_tokens = sum(int(M.mtmd_input_chunk_get_n_tokens(chunks.get(i))) for i in inner)
        return Tokenized(chunks, before, inner, after, n_pos, n_tokens, media.kind)

    def _text_tokens(self, chunk) -> list[int]:
        n = ctypes.c_size_t(0)
        toks = self.M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        return [int(toks[j]) for j in range(n.value)] if toks else []

    # -- files into bitmaps -------------------------------------------------------

    def _bitmap(self, media):
        path = Path(media.path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise MediaError(f"{_name(media)}: cannot read it: {exc.strerror or exc}") from None
        if size == 0:
            raise MediaError(f"{_name(media)}: the file is empty")
        if size > MAX_MEDIA_BYTES:
            raise MediaError(f"{_name(media)}: {size:,} bytes is more than the {MAX_MEDIA_BYTES:,} read")
        if media.kind == "image":
            return self._image_bitmap(media, path)
        return self._audio_bitmap(media, path)

    def _image_bitmap(self, media, path: Path):
        width, height, rgb = decode_image(path, _name(media))
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bitmap = self.M.mtmd_bitmap_init(width, height, buf)
        if not bitmap:
            raise MediaError(f"{_name(media)}: libmtmd refused a {width}x{height} image")
        return bitmap

    def _audio_bitmap(self, media, path: Path):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MediaError(f"{_name(media)}: cannot read it: {exc.strerror or exc}") from None
        check_audio(data, _name(media))
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        LOG_TAIL.clear()
        bitmap = self.M.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(data), False)
        if not bitmap:
            said = llama_said()
            raise MediaError(f"{_name(media)}: the audio could not be decoded (damaged, or a codec "
                             "miniaudio does not read)" + (f": {said}" if said else ""))
        if not self.M.mtmd_bitmap_is_audio(bitmap):  # cannot happen after check_audio; be sure
            self.M.mtmd_bitmap_free(bitmap)
            raise MediaError(f"{_name(media)}: not audio")
        return bitmap

    # -- evaluation -------------------------------------------------------------

    def evaluate(self, tok: Tokenized, lctx, n_past: int, n_batch: int) -> int:
        """Encode ``tok``'s chunks and decode them into ``lctx``'s cache from position
        ``n_past`` (sequence 0), in batches of ``n_batch``; returns the position after
        it. :class:`NoRoom` when llama.cpp finds no room in the cache, BackendError else
        (the caller rolls the cache back either way)."""
        if self.ctx is None:
            raise BackendError("the projector is not loaded")
        if tok.owner.context_id != self.context_id:
            raise BackendError("this medium was tokenized for another load of the model; tokenize it again")
        M = self.M
        pos = n_past
        new_pos = ctypes.c_int32(pos)
        LOG_TAIL.clear()
        for i in tok.chunks:
            new_pos.value = pos  # the helper adds a text chunk's count to it, sets it after a medium
            rc = M.mtmd_helper_eval_chunk_single(self.ctx, lctx, tok.owner.get(i), pos, 0, int(n_batch), False,
                                                 ctypes.byref(new_pos))
            if rc != 0:
                said = llama_said()
                if rc == 1:
                    raise NoRoom(f"llama.cpp found no room in the KV cache for a {tok.kind} of "
                                 f"{tok.n_tokens} tokens")
                raise BackendError(f"libmtmd failed to evaluate the {tok.kind} (code {rc})"
                                   + (f": {said}" if said else ""))
            pos = int(new_pos.value)
        return pos


def _name(media) -> str:
    return f"{media.kind} {media.sha256[:12]}"


# -- decoding and checks (no mtmd needed) -----------------------------------------


def decode_image(path: Path, name: str) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of the image at ``path``: its first frame, EXIF
    orientation applied, transparency composed over white. MediaError for a file
    Pillow cannot read (truncated, not an image) or one past its decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise MediaError(f"{name}: reading images natively needs Pillow (pip install Pillow)") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)  # an animation: its first frame
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                    rgb.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    rgb = im.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise MediaError(f"{name}: too many pixels to decode ({exc})") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"{name}: not an image Pillow can read (damaged, or not an image at all)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated data, a damaged header
        raise MediaError(f"{name}: the image could not be decoded: {exc}") from None
    width, height = rgb.size
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: an empty image ({width}x{height})")
    return width, height, rgb.tobytes()


def audio_format(data: bytes) -> str | None:
    """"wav", "flac" or "mp3" from the magic bytes (what mtmd's helper takes as audio), else None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0):
        return "mp3"
    return None


def check_audio(data: bytes, name: str) -> str:
    """The format of the audio file ``data`` once its header holds up (see the module
    doc); MediaError naming what does not."""
    if not data:
        raise MediaError(f"{name}: the file is empty")
    fmt = audio_format(data)
    if fmt is None:
        raise MediaError(f"{name}: not a WAV, MP3 or FLAC file (the audio formats read natively)")
    if fmt == "wav":
        _check_wav(data, name)
    elif fmt == "flac":
        _check_flac(data, name)
    return fmt


def _check_wav(data: bytes, name: str) -> None:
    pos, fmt, data_len = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise MediaError(f"{name}: a WAV file whose format chunk is cut short")
            tag, channels, rate, _, block_align = struct.unpack_from("<HHIIH", data, body)
            fmt = (tag, channels, rate, block_align)
        elif cid == b"data":
            data_len = size
            if body + size > len(data):
                raise MediaError(f"{name}: a truncated WAV file: its data chunk says {size:,} bytes, "
                                 f"the file holds {len(data) - body:,} after the header")
            break
        pos = body + size + (size & 1)
    if fmt is None:
        raise MediaError(f"{name}: a WAV file without a format chunk (truncated or damaged)")
    if data_len is None:
        raise MediaError(f"{name}: a WAV file without a data chunk (truncated or damaged)")
    tag, channels, rate, block_align = fmt
    if tag not in _WAV_CODECS:
        raise MediaError(f"{name}: a WAV file in codec 0x{tag:04x}, which is not read natively "
                         f"(supported: {', '.join(v for v in _WAV_CODECS.values() if v != 'extensible')})")
    if channels == 0 or rate == 0 or block_align == 0:
        raise MediaError(f"{name}: a damaged WAV header ({channels} channels, {rate} Hz)")
    frames = data_len // block_align
    if frames == 0:
        raise MediaError(f"{name}: no audio samples in it (an empty WAV file)")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise MediaError(f"{name}: {frames / rate:.0f} s of audio is more than the {MAX_AUDIO_SECONDS} s read")


def _check_flac(data: bytes, name: str) -> None:
    # STREAMINFO is the first metadata block: 4-byte block header, then 34 bytes
    if len(data) < 8 + 18:
        raise MediaError(f"{name}: a truncated FLAC file")
    if data[4] & 0x7F != 0:
        raise MediaError(f"{name}: a damaged FLAC file (no STREAMINFO block first)")
    info = data[8:8 + 18]
    rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4)
    total = ((info[13] & 0x0F) << 32) | struct.unpack(">I", info[14:18])[0]
    if rate == 0:
        raise MediaError(f"{name}: a damaged FLAC header (sample rate 0)")
    if total and total / rate > MAX_AUDIO_SECONDS:
        raise MediaError(f"{name}: {total / rate:.0f} s of audio is more than the {MAX_AUDIO_SECONDS} s read")
