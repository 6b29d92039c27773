"""The daemon's OpenAI- and Ollama-compatible HTTP API (off unless ``http.listen`` is set).

``HttpService`` (``app``) is what the daemon starts and stops. The rest, by
concern: ``listen`` (where it listens and the rule for exposing it),
``auth`` (API keys), ``errors`` (each API's error shape), ``incoming`` (the
body, the session and the client of a request), ``runs`` (chats and
embeddings run for a request, through the same chat path as JSON-RPC),
``streaming`` (server-sent events and NDJSON), ``toolcalls`` (tools the
client runs), ``models`` (alias-only model names and listings), and the two
APIs, ``openai_api`` and ``ollama_api``. docs/http.md is the user's guide.
"""

from assistant.daemon.http.app import HttpService

__all__ = ["HttpService"]
