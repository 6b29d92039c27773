"""Media (images, audio) in chat messages: the daemon's side.

A chat message's content may be a list of parts (docs/protocol.md, "Media").
The path of a medium through the daemon, one module a step:

- ``parts``: the content parts a client sent, in every accepted shape
  (ours, OpenAI's ``image_url`` / ``input_audio``), checked and normalised;
  shape errors are ``INVALID_PARAMS`` naming the part;
- ``checks``: the bytes of one medium read (a path, with its size checked
  before reading; base64, with its length checked before decoding) and
  checked: type sniffed from the bytes, never the name; images decoded by
  Pillow under the pixel limit; audio headers parsed for codec and duration,
  nothing decoded;
- ``store``: the checked bytes kept content-addressed under
  ``<data_dir>/media`` (0700 dirs, 0600 files, temp + fsync + rename; the
  same bytes once);
- ``ingest``: the steps above for a message's parts, giving the parts the
  session keeps (``{"type": "image", "sha256", "mime", "name"}``);
- ``routing``: per media part at chat time, native (the model's backend reads
  it) or the fallback skill's text (``vision.ocr``, ``audio.transcribe``;
  cached by sha256), or ``MEDIA_UNSUPPORTED``.

Limits come from the config's ``media`` section (``Limits.from_config``).
"""

from __future__ import annotations

from assistant.daemon.media.checks import Limits

__all__ = ["Limits"]
