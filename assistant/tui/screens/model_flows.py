"""The current session's settings, model, backend and drafter: the settings
screen (F3) and the command palette's "Model:", "Backend:" and "Drafter:"
entries, saved through the daemon (``sessions.update``; a model or backend
change also ``models.load``).

Each flow runs in a worker of the chat screen (``ChatScreen.run_flow``); what
the daemon has loaded is the app's (``app.loaded``, ``app.model_names``), kept
up to date by its events.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

from textual.app import SystemCommand

from assistant.protocol import RPCError
from assistant.tui.format import session_title
from assistant.tui.connection import CALL_FAILURES, failure_text
from assistant.tui.screens import session_flows

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen

BACKENDS = ("auto", "llama.cpp", "mlx")
FALLBACK_MODEL = "smollm2-135m"  # shown when neither the session nor the daemon names one


def _choices(screen: "ChatScreen") -> tuple[str, list[str], str, list[str]]:
    """The current model and backend, and the lists the settings screen offers for them."""
    app = screen.app
    model = screen.current_model() or FALLBACK_MODEL
    models = app.model_names or [model]
    if model not in models:
        models = [model] + models
    backend = app.loaded.get(model) or "auto"
    backends = list(BACKENDS) + [b for b in app.loaded.values() if b and b not in BACKENDS]
    if backend not in backends:
        backends.append(backend)
    return model, models, backend, backends


async def settings(screen: "ChatScreen") -> None:
    """The settings screen for the current session, then what it changed."""
    from assistant.tui.screens.settings import SettingsScreen

    await screen.app.refresh_models(screen.client)
    model, models, backend, backends = _choices(screen)
    result = await screen.app.push_screen_wait(SettingsScreen(screen.session, models=models, backends=backends,
                                                              model=model, backend=backend))
    if result is None:
        return
    await apply_settings(screen, result, old_model=model, old_backend=backend)


async def apply_settings(screen: "ChatScreen", result: dict[str, Any], *, old_model: str | None,
                         old_backend: str | None) -> None:
    """Save what the settings screen returned; load the model if it or its backend changed."""
    params: dict[str, Any] = {"id": screen.session["id"], "system": result["system"],
                              "settings": result["settings"]}
    if result["title"]:  # the protocol cannot clear a title; an empty field keeps it
        params["title"] = result["title"]
    if result["model"] != old_model:
        params["model"] = result["model"]
    try:
        updated = await screen.client.call("sessions.update", params)
    except CALL_FAILURES as exc:
        screen.notify(f"Settings not saved: {failure_text(exc)}", severity="error")
        return
    screen.session.update({k: v for k, v in updated.items() if k != "message_count"})
    screen.sub_title = session_title(screen.session)
    await session_flows.refresh(screen)
    screen.update_model_status()
    screen.notify("Session settings saved.")
    backend = result["backend"]
    if result["model"] != old_model or (backend != old_backend and backend != "auto"):
        await load_model(screen, result["model"], backend if backend != "auto" else None)


async def load_model(screen: "ChatScreen", model: str, backend: str | None) -> None:
    """``models.load``, with the wait shown in the status line."""
    screen.status_bar.set(busy=f"loading {model}" + (f" with {backend}" if backend else "") + "…")
    try:
        params = {"model": model}
        if backend:
            params["backend"] = backend
        info = await screen.client.call("models.load", params)
    except CALL_FAILURES as exc:
        screen.notify(f"Could not load {model}: {failure_text(exc)}", severity="error", timeout=10)
        return
    finally:
        screen.status_bar.set(busy="")
    screen.app.loaded[info.get("name", model)] = info.get("backend")
    screen.update_model_status()
    screen.notify(f"{info.get('name', model)} loaded with {info.get('backend')}.")


async def switch_model(screen: "ChatScreen", model: str) -> None:
    """Use ``model`` in the current session, and load it."""
    if not screen.need_session():
        return
    try:
        updated = await screen.client.call("sessions.update", {"id": screen.session["id"], "model": model})
    except (RPCError, ConnectionError) as exc:
        screen.notify(f"Could not switch model: {failure_text(exc)}", severity="error")
        return
    screen.session["model"] = updated.get("model")
    screen.update_model_status()
    await load_model(screen, model, None)


async def switch_backend(screen: "ChatScreen", backend: str) -> None:
    """Reload the current model with ``backend`` (``auto``: the daemon's choice)."""
    if screen.client is None:
        screen.notify("Not connected to the daemon.", severity="error")
        return
    model = screen.current_model()
    if model:
        await load_model(screen, model, None if backend == "auto" else backend)


async def switch_drafter(screen: "ChatScreen", drafter: str | None) -> None:
    """The current session's speculative-decoding drafter (None: the daemon's default)."""
    if not screen.need_session():
        return
    settings = dict(screen.session.get("settings") or {})
    if drafter:
        settings["draft"] = drafter
    else:
        settings.pop("draft", None)
    try:
        await screen.client.call("sessions.update", {"id": screen.session["id"], "settings": settings})
    except (RPCError, ConnectionError) as exc:
        screen.notify(f"Could not set the drafter: {failure_text(exc)}", severity="error")
        return
    screen.session["settings"] = settings
    screen.notify(f"Drafter for this session: {drafter or 'the daemon default'}.")


def palette_commands(screen: "ChatScreen") -> Iterable[SystemCommand]:
    """The palette's model, backend and drafter switches (found by typing, not listed)."""
    from assistant.tui.screens.settings import DRAFTERS

    for name in screen.app.model_names:
        yield SystemCommand(f"Model: {name}", "Use this model in the current session (loads it in the daemon)",
                            partial(screen.run_flow, switch_model, name), discover=False)
    for backend in BACKENDS:
        yield SystemCommand(f"Backend: {backend}", "Reload the current model with this backend",
                            partial(screen.run_flow, switch_backend, backend), discover=False)
    yield SystemCommand("Drafter: daemon default", "Speculative decoding as the daemon's config says",
                        partial(screen.run_flow, switch_drafter, None), discover=False)
    for drafter in DRAFTERS:
        yield SystemCommand(f"Drafter: {drafter}", "Speculative-decoding drafter for this session",
                            partial(screen.run_flow, switch_drafter, drafter), discover=False)
