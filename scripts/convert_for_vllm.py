"""Turn a GGUF model into a Hugging Face model folder that vLLM (and mlx-lm) can load.

vLLM does not load the embedded SmolLM2 GGUF itself, so transformers (with the
``gguf`` package) dequantizes it: ``from_pretrained(dir, gguf_file=...)``.
``save_pretrained`` refuses a model loaded from GGUF, so the folder is written
by hand: the state dict as safetensors, ``config.json`` without the
``quantization_config`` the GGUF load left in it, the tokenizer (with the
GGUF's chat template) and a generation config. An output matrix that is the
embedding matrix (tied, as in SmolLM2) is dropped and ``tie_word_embeddings``
set, as the original checkpoint has it.

The weights come out as float32 (517 MB for SmolLM2-135M): the Q4_1 values
dequantized exactly, so a model run on them differs from llama.cpp's Q4_1
kernels only in arithmetic order and precision, not in its weights.

Run it with the scale environment's python (``scripts/scale-setup`` prints it),
which has transformers, torch, gguf and safetensors; the main venv has no torch::

    .venv-scale/bin/python scripts/convert_for_vllm.py --gguf MODEL.gguf [--out DIR]

It prints the folder. A folder converted before from the same file (by
content) with this version of the script is reused: the stamp file in it
names both. The folder is written beside its final place and renamed into
it, so a conversion killed halfway never leaves a folder that looks done.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the folder's contents change, so that stale conversions are redone.
FORMAT = 3
STAMP_PREFIX = ".converted-"


def default_out() -> Path:
    """~/.cache/assistant-build/smollm2-hf (under $XDG_CACHE_HOME when set)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "assistant-build" / "smollm2-hf"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stamp_name(gguf: Path) -> str:
    """The stamp of a conversion: this script's format and the GGUF's content."""
    return f"{STAMP_PREFIX}v{FORMAT}-{file_digest(gguf)[:20]}"


def is_converted(out: Path, stamp: str) -> bool:
    return (out / stamp).is_file() and (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@contextlib.contextmanager
def locked(out: Path):
    """One conversion at a time per folder (two test runs may start together)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _state_and_tied(model) -> tuple[dict, bool]:
    """The state dict to write, and whether the output matrix is the embedding matrix."""
    import torch

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    tied = head is None or (embed is not None and head.shape == embed.shape and torch.equal(head, embed))
    if tied:
        state.pop("lm_head.weight", None)
    return state, tied


def _config(model, tied: bool) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights written are plain float32
    for key in ("_name_or_path", "_model_name_or_path"):  # where it was converted: no use to anyone
        config.pop(key, None)
    # A GGUF load leaves this empty; vLLM picks its model class by it.
    config["architectures"] = [type(model).__name__]
    config["tie_word_embeddings"] = tied
    config["torch_dtype"] = config["dtype"] = "float32"
    # transformers 5 writes RoPE settings only as rope_parameters; readers of the older layout
    # (mlx-lm 0.32's llama among them) look for rope_theta at the top and silently take their
    # default (10000; SmolLM2's is 100000) without it. Both layouts, then: transformers and vLLM
    # read rope_parameters.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    return config


def convert(gguf: Path, dest: Path) -> None:
    """Write the model folder for ``gguf`` into ``dest`` (an empty folder)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{gguf}: the GGUF carries no chat template (tokenizer.chat_template)")
    state, tied = _state_and_tied(model)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(_config(model, tied), indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(dest))
    gen = model.generation_config.to_dict()
    gen = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if gen.get(k) is not None}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _check_replaceable(out: Path) -> None:
    """Only an earlier conversion is ever replaced: a folder with files and without one of
    our stamps (say --out pointed at a folder of the user's) is refused, never deleted."""
    if out.is_dir() and any(out.iterdir()) and not any(p.name.startswith(STAMP_PREFIX) for p in out.iterdir()):
        raise SystemExit(f"{out} exists and is not a conversion of this script (no {STAMP_PREFIX}* stamp); "
                         "not overwriting it: pass another --out")


def ensure(gguf: Path, out: Path) -> Path:
    """``out`` holding the conversion of ``gguf``: reused when its stamp matches, else made anew."""
    stamp = stamp_name(gguf)
    with locked(out):
        if is_converted(out, stamp):
            return out
        _check_replaceable(out)  # before the work, not after
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            convert(gguf, tmp)
            (tmp / stamp).write_text(f"{gguf.name}\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True, help="the GGUF file to convert")
    ap.add_argument("--out", type=Path, default=None, help=f"the model folder (default {default_out()})")
    args = ap.parse_args(argv)
    gguf = args.gguf.resolve()
    if not gguf.is_file():
        ap.error(f"no such file: {gguf}")
    out = (args.out or default_out()).resolve()
    if out == out.parent or out.is_file():
        ap.error(f"--out must name a folder to (re)write, not {out}")
    print(ensure(gguf, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
