"""Images and audio read natively by Gemma 4 on the MLX backend, through mlx-vlm's towers.

mlx-lm loads only Gemma 4's text model (its ``gemma4`` module drops the
vision and audio weights). A ``gemma4`` folder as mlx-community publishes it
also holds mlx-vlm's towers: ``vision_tower`` + ``embed_vision`` (a ViT with
2-D RoPE, pooled ``pooling_kernel_size``² patches to a soft token, then an
RMS norm and a projection to the text width) and ``audio_tower`` +
``embed_audio`` (a Conformer over 128-bin log-mel frames, 4x subsampled:
one soft token per 40 ms). This module loads those towers from the same
files with mlx-vlm 0.7.10's modules (the ``[vlm]`` extra), preprocesses each
medium with mlx-vlm's own ``Gemma4ImageProcessor`` and
``Gemma4AudioFeatureExtractor`` (numpy; the settings from the folder's
``processor_config.json``, as mlx-vlm's processor reads them), and runs the
soft tokens through mlx-lm's text model on the backend's own cache.

What mlx-vlm's ``stream_generate(model, processor, prompt, image=, audio=)``
does, and so what this does (checked in tests/test_mlx_media.py against
mlx-vlm's own forward over the same folder):

- an image becomes ``<|image>`` + n x ``<|image|>`` + ``<image|>`` (n from the
  processor's aspect-preserving resize within ``max_soft_tokens``), audio
  ``<|audio>`` + n x ``<|audio|>`` + ``<audio|>`` (n = ceil(ms / 40), at most
  ``audio_seq_length``); the soft tokens' input embeddings are the tower's
  output as is (text embeddings are scaled by sqrt(hidden), these are not),
  and their per-layer inputs (Gemma 4 E2B/E4B) those of token 0;
- with ``use_bidirectional_attention: "vision"`` (the real configs), an
  image's soft tokens attend to each other both ways, in full and
  sliding-window layers alike; everything else stays causal (audio too).

The begin/end tokens are ordinary text tokens in the prompt; a medium's span
(``MediaSpan``) is its soft tokens only. Audio is decoded here from WAV
(PCM, 8 to 32 bits, any rate: resampled to 16 kHz) with the stdlib ``wave``
and numpy; MP3 and FLAC would need a decoder mlx-vlm leaves to mlx-audio, so
they are refused with a clear error (the llama.cpp backend decodes them).
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import MediaError, ModelLoadError
from .mlx_native import installed_version, spec_found

VLM_HINT = "pip install 'local-assistant[vlm]'"
TOWERS = {"image": ("vision_tower", "embed_vision"), "audio": ("audio_tower", "embed_audio")}
AUDIO_RATE = 16_000  # what Gemma 4's audio tower hears (the feature extractor's sampling_rate)
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class MediaTokens:
    """Gemma 4's media token ids (config.json; mlx-vlm's defaults where it says none)."""

    image: int
    boi: int
    eoi: int
    audio: int
    boa: int
    eoa: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MediaTokens":
        d = {"image_token_id": 258880, "boi_token_id": 255999, "eoi_token_id": 258882,
             "audio_token_id": 258881, "boa_token_id": 256000, "eoa_token_id": 258883}
        v = {k: config.get(k, default) for k, default in d.items()}
        return cls(image=int(v["image_token_id"]), boi=int(v["boi_token_id"]), eoi=int(v["eoi_token_id"]),
                   audio=int(v["audio_token_id"]), boa=int(v["boa_token_id"]), eoa=int(v["eoa_token_id"]))

    def around(self, kind: str) -> tuple[int, int]:
        """(begin, end) token of a medium of ``kind``."""
        return (self.boi, self.eoi) if kind == "image" else (self.boa, self.eoa)


@dataclass
class Prepared:
    """One medium decoded and preprocessed: ``n_tokens`` soft tokens from ``inputs``."""

    kind: str
    n_tokens: int
    inputs: dict[str, Any]


# ---------------------------------------------------------------------------
# What a folder holds (cheap: JSON and safetensors headers)


def tensor_names(folder: Path) -> set[str]:
    """The tensor names in the folder's model*.safetensors (headers only), "model." stripped."""
    names: set[str] = set()
    for file in sorted(folder.glob("model*.safetensors")):
        try:
            with file.open("rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > _MAX_HEADER:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{file} is not a valid safetensors file ({exc})") from None
        names.update(k.removeprefix("model.") for k in header if k != "__metadata__")
    return names


def probe(folder: Path, config: dict[str, Any]) -> tuple[frozenset[str], str]:
    """(the media kinds the folder has towers for, why none where it has none).
    A kind counts when its config (``vision_config``, ``audio_config``) is set
    and its tower's and embedder's weights are in the files."""
    if config.get("model_type") != "gemma4":
        return frozenset(), (f"the MLX backend reads media natively only for Gemma 4 (model_type gemma4); "
                             f"this folder is {config.get('model_type')!r}")
    names = tensor_names(folder)
    kinds = set()
    for kind, (tower, embedder) in TOWERS.items():
        cfg = config.get("vision_config" if kind == "image" else "audio_config")
        if isinstance(cfg, dict) and any(n.startswith(tower + ".") for n in names) and \
                any(n.startswith(embedder + ".") for n in names):
            kinds.add(kind)
    if not kinds:
        return frozenset(), "the folder has no vision or audio tower (a text-only conversion)"
    return frozenset(kinds), ""


def vlm_missing() -> str | None:
    """Why mlx-vlm's Gemma 4 towers cannot be imported here, or None when they can."""
    if not spec_found("mlx_vlm"):
        return f"images and audio on MLX need mlx-vlm, which is not installed; install: {VLM_HINT}"
    try:
        from mlx_vlm.models.gemma4 import audio, audio_feature_extractor, processing_gemma4, vision  # noqa: F401
    except ImportError as exc:
        return (f"mlx-vlm {installed_version('mlx-vlm')} is installed but its Gemma 4 towers cannot be imported "
                f"({exc}); install: {VLM_HINT}")
    return None


def processor_settings(folder: Path) -> dict[str, Any]:
    """What mlx-vlm's ``Gemma4Processor.from_pretrained`` reads from the folder:
    the image processor's and the audio feature extractor's settings, and the
    audio token budget (``audio_seq_length``, ``audio_ms_per_token``)."""
    from .tokenizer import read_json

    cfg = read_json(folder / "processor_config.json") or read_json(folder / "preprocessor_config.json")
    image: dict[str, Any] = {}
    if isinstance(cfg.get("image_processor"), dict):
        image = {k: v for k, v in cfg["image_processor"].items() if k != "image_processor_type"}
    elif "image_processor_type" not in cfg:  # the flat (preprocessor_config.json) layout
        image = {k: cfg[k] for k in ("patch_size", "max_soft_tokens", "pooling_kernel_size", "do_resize",
                                     "do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std",
                                     "size") if k in cfg}
    audio = {k: v for k, v in (cfg.get("feature_extractor") or {}).items() if k != "feature_extractor_type"} \
        if isinstance(cfg.get("feature_extractor"), dict) else {}
    return {"image": image, "audio": audio, "audio_seq_length": int(cfg.get("audio_seq_length", 750)),
            "audio_ms_per_token": float(cfg.get("audio_ms_per_token", 40))}


# ---------------------------------------------------------------------------
# The towers


class Towers:
    """Gemma 4's vision and/or audio tower and embedder, loaded beside mlx-lm's text model."""

    def __init__(self, module: Any, kinds: frozenset[str], config: dict[str, Any], settings: dict[str, Any]):
        from mlx_vlm.models.gemma4.audio_feature_extractor import Gemma4AudioFeatureExtractor
        from mlx_vlm.models.gemma4.processing_gemma4 import Gemma4ImageProcessor

        self.module = module
        self.kinds = kinds
        self.tokens = MediaTokens.from_config(config)
        text = config.get("text_config") or {}
        self.bidirectional = text.get("use_bidirectional_attention") == "vision"
        self.image_processor = Gemma4ImageProcessor(**settings["image"]) if "image" in kinds else None
        self.audio_extractor = None
        self.audio_ms_per_token = settings["audio_ms_per_token"]
        self.audio_seq_length = settings["audio_seq_length"]
        self.max_audio_seconds = 0.0
        if "audio" in kinds:
            with warnings.catch_warnings():  # transformers' mel filter bank warns about empty top bins
                warnings.simplefilter("ignore")
                self.audio_extractor = Gemma4AudioFeatureExtractor(**settings["audio"])
            if self.audio_extractor.sampling_rate != AUDIO_RATE:
                raise ModelLoadError(f"the audio feature extractor runs at {self.audio_extractor.sampling_rate} Hz; "
                                     f"this backend decodes audio for {AUDIO_RATE} Hz")
            # What the processor keeps: its token budget, and the extractor's 480000 samples (30 s).
            self.max_audio_seconds = min(self.audio_seq_length * self.audio_ms_per_token / 1000.0,
                                         480_000 / AUDIO_RATE)

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], kinds: frozenset[str], dtype: Any | None) -> "Towers":
        """The towers of ``kinds`` from the folder's weights (mlx-vlm's modules
        and its weight renames), cast to ``dtype`` (None: as stored) and evaluated."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_vlm.models.gemma4.audio import AudioEncoder
        from mlx_vlm.models.gemma4.config import AudioConfig, ModelConfig, VisionConfig
        from mlx_vlm.models.gemma4.gemma4 import Model as Gemma4, MultimodalEmbedder
        from mlx_vlm.models.gemma4.vision import VisionModel

        hidden = int((config.get("text_config") or {}).get("hidden_size") or 0)
        module = nn.Module()
        vc = ac = None
        if "image" in kinds:
            vc = VisionConfig.from_dict(config["vision_config"])
            module.vision_tower = VisionModel(vc)
            module.embed_vision = MultimodalEmbedder(vc.hidden_size, hidden, vc.rms_norm_eps)
        if "audio" in kinds:
            ac = AudioConfig.from_dict(config["audio_config"])
            module.audio_tower = AudioEncoder(ac)
            module.embed_audio = MultimodalEmbedder(ac.output_proj_dims or ac.hidden_size, hidden, ac.rms_norm_eps)
        prefixes = tuple(p + "." for kind in kinds for p in TOWERS[kind])
        weights = {}
        for file in sorted(folder.glob("model*.safetensors")):
            for k, v in mx.load(str(file)).items():
                if k.removeprefix("model.").startswith(prefixes):
                    weights[k] = v
        # mlx-vlm's own renames (the "model." prefix, PyTorch conv layouts, unused clip bounds), through
        # its Model.sanitize on a stand-in that has just what that method reads.
        stand_in = type("Towers", (), {})()
        stand_in.config = ModelConfig(vision_config=vc or VisionConfig(), audio_config=ac)
        stand_in.audio_tower = getattr(module, "audio_tower", None)
        weights = Gemma4.sanitize(stand_in, weights)
        q = config.get("quantization")
        if isinstance(q, dict) and any(k.endswith(".scales") for k in weights):
            def quantized(path: str, m: Any) -> bool | dict:
                # As mlx-vlm loads a quantized conversion: the layers stored quantized, with
                # per-layer settings where config.json has them.
                if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights:
                    return False
                own = q.get(path) or q.get(f"model.{path}")
                return own if isinstance(own, dict) else True

            nn.quantize(module, group_size=int(q.get("group_size", 64)), bits=int(q.get("bits", 4)),
                        mode=q.get("mode", "affine"), class_predicate=quantized)
            # mlx-vlm's audio attention keeps a second reference to its relative_k_proj (in a private
            # helper that nn.quantize does not see): point it at the quantized layer, or it would keep
            # the unloaded float one.
            for layer in getattr(getattr(module, "audio_tower", None), "layers", []):
                layer.self_attn._rel_pos.pos_proj = layer.self_attn.relative_k_proj
        module.load_weights(list(weights.items()), strict=True)
        if dtype is not None:
            module.set_dtype(dtype)
        mx.eval(module.parameters())
        return cls(module, kinds, config, processor_settings(folder))

    def describe(self) -> str:
        """What ``ModelInfo.choices["media"]`` says."""
        said = []
        if "image" in self.kinds:
            said.append(f"images (at most {self.image_processor.max_soft_tokens} soft tokens each"
                        f"{', bidirectional within an image' if self.bidirectional else ''})")
        if "audio" in self.kinds:
            said.append(f"audio (WAV, at most {self.max_audio_seconds:g} s a part, "
                        f"{self.audio_ms_per_token:g} ms a token)")
        return f"{' and '.join(said)} read natively through mlx-vlm {installed_version('mlx-vlm')}'s towers"

    # -- preprocessing --------------------------------------------------------

    def prepare(self, kind: str, path: str, name: str) -> Prepared:
        """Decode and preprocess one medium as mlx-vlm's processor does; MediaError for a bad file."""
        if kind not in self.kinds:
            raise MediaError(f"this model reads no {kind} natively")
        if not Path(path).is_file():  # never open anything else: a FIFO would block
            raise MediaError(f"{name} is not a readable file")
        if kind == "image":
            image = decode_image(path, name)
            try:
                data, counts = self.image_processor.preprocess([image])
            except ValueError as exc:  # e.g. "Attempting to resize to a 0 x 0 image."
                raise MediaError(f"cannot prepare image {name}: {exc}") from None
            pixels = np.asarray(data["pixel_values"] if not isinstance(data["pixel_values"], list)
                                else data["pixel_values"][0][None], dtype=np.float32)
            return Prepared("image", int(counts[0]), {"pixel_values": pixels})
        wave = decode_wav(path, name, max_seconds=self.max_audio_seconds)
        n = min(math.ceil(len(wave) / AUDIO_RATE * 1000.0 / self.audio_ms_per_token), self.audio_seq_length)
        out = self.audio_extractor([wave], sampling_rate=AUDIO_RATE, return_attention_mask=True)
        return Prepared("audio", int(n), {"features": np.asarray(out["input_features"][0], dtype=np.float32),
                                          "valid": np.asarray(out["input_features_mask"][0], dtype=bool)})

    # -- encoding -------------------------------------------------------------

    def encode(self, prepared: Prepared, dtype: Any) -> Any:
        """The medium's soft-token embeddings, (n_tokens, text hidden size), evaluated."""
        import mlx.core as mx

        m = self.module
        if prepared.kind == "image":
            feats = m.embed_vision(m.vision_tower(mx.array(prepared.inputs["pixel_values"])))
        else:
            mel = mx.array(prepared.inputs["features"])[None]
            invalid = mx.array(~prepared.inputs["valid"])[None]
            enc, _ = m.audio_tower(mel, invalid)
            feats = m.embed_audio(enc)
        feats = feats[0]
        rows, n = feats.shape[0], prepared.n_tokens
        if rows != n:
            # mlx-vlm's masked_scatter fills the n positions from the tower's rows in order and wraps
            # around when the tower gives fewer (audio whose length is just past a 40 ms step: one row short).
            feats = feats[mx.arange(n) % rows]
        feats = feats.astype(dtype)
        mx.eval(feats)
        return feats


# ---------------------------------------------------------------------------
# Running soft tokens through the text model


def span_mask(n0: int, n: int, window: int | None, bidirectional: bool) -> Any:
    """The attention mask of ``n`` new rows at positions ``n0``.. over ``n0 + n``
    keys: causal (within ``window`` for sliding layers), and, ``bidirectional``,
    every row also sees every key of the span itself."""
    import mlx.core as mx
    from mlx_lm.models.base import create_causal_mask

    mask = create_causal_mask(n, offset=n0, window_size=window)
    if bidirectional:
        mask = mask | (mx.arange(n0 + n) >= n0)[None]
    return mask


def forward_embeddings(model: Any, cache: list[Any], h: Any, n0: int, bidirectional: bool) -> Any:
    """Run the input embeddings ``h`` (1, n, hidden) through mlx-lm's Gemma 4
    text model at positions ``n0``.., appending to ``cache`` (one KVCache per
    layer with K/V of its own); the hidden states after the final norm.

    mlx-lm's ``Gemma4TextModel.__call__`` takes input embeddings but scales them
    as text and builds its own causal masks; this is the same layer loop with
    the soft tokens unscaled and the span's own mask (``span_mask``)."""
    from . import mlx_gemma4

    body = mlx_gemma4.body(model)
    n = h.shape[1]
    layers = body.layers
    per_layer: list[Any] = [None] * len(layers)
    if body.hidden_size_per_layer_input:
        import mlx.core as mx

        # A soft token's per-layer input is token 0's (mlx-vlm maps media positions to the pad id).
        pli = body._project_per_layer_inputs(h, body._get_per_layer_inputs(mx.zeros((1, n), dtype=mx.int32)))
        per_layer = [pli[:, :, i, :] for i in range(len(layers))]
    caches = list(cache) + [None] * (len(layers) - len(cache))
    masks = {"full_attention": span_mask(n0, n, None, bidirectional),
             "sliding_attention": span_mask(n0, n, body.window_size, bidirectional)}
    intermediates: list[tuple[Any, Any]] = [(None, None)] * len(layers)
    for idx, (layer, c, prev, pl) in enumerate(zip(layers, caches, body.previous_kvs, per_layer)):
        kvs, offset = intermediates[prev]
        h, kvs, offset = layer(h, masks[layer.layer_type], c, per_layer_input=pl, shared_kv=kvs, offset=offset)
        intermediates[idx] = (kvs, offset)
    return body.norm(h)


# ---------------------------------------------------------------------------
# Decoding


def decode_image(path: str, name: str) -> Any:
    """The first frame of the image file at ``path`` as an RGB Pillow image;
    MediaError for a file Pillow cannot read, a truncated one or a decompression bomb."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MediaError(f"reading images needs Pillow; install: {VLM_HINT}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)  # an animated image: its first frame
                img.load()
                return img.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError(f"{name} is not an image this model can read (Pillow does not recognise it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"{name} is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise MediaError(f"cannot decode image {name}: {exc}") from None


def decode_wav(path: str, name: str, *, max_seconds: float) -> np.ndarray:
    """The WAV file at ``path`` as float32 mono samples at 16 kHz (channels
    averaged, resampled); MediaError for another format, an empty or truncated
    file, or one longer than ``max_seconds`` (checked from the header, before
    the samples are read)."""
    import wave

    with open(path, "rb") as f:
        magic = f.read(12)
    if magic[:4] != b"RIFF" or magic[8:12] != b"WAVE":
        kind = "MP3" if magic[:3] == b"ID3" or magic[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2") else \
            "FLAC" if magic[:4] == b"fLaC" else "OGG" if magic[:4] == b"OggS" else None
        if kind:
            raise MediaError(f"{name} is {kind} audio; the MLX backend decodes WAV (PCM) only: convert it "
                             "(e.g. ffmpeg -i in -ar 16000 out.wav) or use a llama.cpp model")
        raise MediaError(f"{name} is not a WAV file")
    try:
        with wave.open(path, "rb") as w:
            rate, width, channels, frames = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            if frames == 0:
                raise MediaError(f"{name} holds no audio samples")
            if rate <= 0 or channels <= 0:
                raise MediaError(f"{name} has an invalid header ({rate} Hz, {channels} channels)")
            if frames / rate > max_seconds:
                raise MediaError(f"{name} is {frames / rate:.1f} s long; this model hears at most "
                                 f"{max_seconds:g} s of audio a part (cut it, or let it be transcribed)")
            data = w.readframes(frames)
    except (wave.Error, EOFError, struct.error) as exc:
        raise MediaError(f"cannot decode {name} as WAV: {exc}") from None
    got = len(data) // (width * channels)
    if got < frames:
        raise MediaError(f"{name} is truncated: its header says {frames} samples, it holds {got}")
    if width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(data, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise MediaError(f"{name} has {width * 8}-bit samples, which this decoder does not read")
    x = x.reshape(-1, channels).mean(axis=1) if channels > 1 else x
    return resample(x, rate, AUDIO_RATE)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``x`` at ``rate`` Hz resampled to ``target`` Hz, band-limited (by FFT:
    the spectrum cut or zero-padded to the new length)."""
    if rate == target:
        return np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    m = max(1, int(round(n * target / rate)))
    spectrum = np.fft.rfft(x.astype(np.float64))
    keep = m // 2 + 1
    out = np.zeros(keep, dtype=np.complex128)
    k = min(keep, len(spectrum))
    out[:k] = spectrum[:k]
    return (np.fft.irfft(out, m) * (m / n)).astype(np.float32)
