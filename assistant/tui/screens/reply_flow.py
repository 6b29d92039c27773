"""Sending a message and streaming the reply into the chat; regenerating the last one.

:func:`send` runs in a worker of the chat screen (group ``chat``), started
by Enter in the input (``ChatScreen.submitted``) or by :func:`regenerate`.
An attachment goes to its skill first, and what the skill made of the file
is sent with the message. The reply streams into a message view at most
``STREAM_FPS`` times a second; its figures go to the status line, and the
session gets its title from the first message. A daemon error ends up as an
error message in the chat, a lost connection as a note on the reply.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from assistant.protocol import ErrorCode, RPCError
from assistant.tui import attachments
from assistant.tui.format import session_title, title_from_prompt
from assistant.tui.keys import display_key
from assistant.tui.screens import session_flows
from assistant.tui.widgets.chat import ChatView, MessageView

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
STREAM_FPS = 15


def chat_params(session: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The ``chat`` request for ``prompt`` in ``session``: its sampling settings and drafter."""
    settings = session.get("settings") or {}
    params: dict[str, Any] = {"prompt": prompt, "session": session["id"]}
    for key in SAMPLING_KEYS:
        if settings.get(key) is not None:
            params[key] = settings[key]
    if settings.get("draft"):
        params["draft"] = settings["draft"]
    return params


async def send(screen: "ChatScreen", prompt: str, att: attachments.Attachment | None = None,
               show_user: bool = True) -> None:
    """Send ``prompt`` (with what a skill made of ``att``) and stream the reply into the chat.
    The caller has set ``screen.busy``; this clears it when the reply is over."""
    chat = screen.query_one(ChatView)
    client = screen.client
    view: MessageView | None = None
    user_view: MessageView | None = None
    try:
        chat.anchor()
        if show_user:
            shown = prompt if att is None else (prompt + ("\n" if prompt else "") + f"[attached {att.label}]")
            user_view = await chat.add(MessageView("user", shown))
        sent = prompt if att is None else await _read_attachment(screen, client, att, prompt)
        if sent is None:
            return
        view = await chat.add(MessageView("assistant", "", model=screen.current_model()))
        result = await _stream_reply(screen, client, view, sent)
        await _reply_done(screen, client, result, view, user_view, prompt)
    except RPCError as exc:
        if view is not None:
            await view.end_stream()
            if not view.text:
                await view.remove()
        await chat.add(MessageView("error", exc.message))
    except ConnectionError:
        if view is not None:
            await view.end_stream()
            view.set_note("incomplete: the daemon went away")
        else:
            await chat.add(MessageView("error", "Not sent: the connection to the daemon was lost."))
    finally:
        screen.stream = None
        screen.busy = False
        screen.status_bar.set(busy="")
        screen.refresh_bindings()


async def _read_attachment(screen: "ChatScreen", client: Any, att: attachments.Attachment,
                           prompt: str) -> str | None:
    """The message with the skill's reading of the file; None (and an error in the chat) if it failed."""
    screen.status_bar.set(busy=f"{att.skill['name']} is reading {att.path.name}…")
    try:
        res = await client.call("skills.call", {"name": att.skill["name"],
                                                "arguments": attachments.skill_arguments(att, prompt)})
    except RPCError as exc:
        await screen.query_one(ChatView).add(MessageView(
            "error", f"{att.skill['name']} could not read {att.path.name}: {exc.message}"))
        return None
    return attachments.message_with_result(att, prompt, res.get("result"))


async def _stream_reply(screen: "ChatScreen", client: Any, view: MessageView, prompt: str) -> dict[str, Any]:
    """Stream the reply to ``prompt`` into ``view`` (the cancel key can stop it); the daemon's result."""
    screen.status_bar.set(busy=f"generating… ({display_key(screen.keys['cancel'])} cancels)")
    stream = await client.chat(**chat_params(screen.session, prompt))
    screen.stream = stream
    screen.refresh_bindings()
    view.start_stream()
    # chunks(): every delta that arrived while the screen was repainting, in one piece
    async for delta in (stream.chunks() if hasattr(stream, "chunks") else stream):
        await view.write(delta)
        # At most ~STREAM_FPS repaints a second: what arrives meanwhile joins the next chunk,
        # so a fast model costs fewer layouts and the screen never falls behind.
        await asyncio.sleep(1 / STREAM_FPS)
    result = await stream.result()
    await view.end_stream(result.get("text", view.text))
    return result


async def _reply_done(screen: "ChatScreen", client: Any, result: dict[str, Any], view: MessageView,
                      user_view: MessageView | None, prompt: str) -> None:
    """The finished reply: ids, figures, why it stopped, and a title for a new session."""
    view.message_id = result.get("message_id")
    if user_view is not None:
        user_view.message_id = result.get("user_message_id")
    stats = result.get("stats") or {}
    screen.last_stats = stats
    view.set_model(stats.get("model") or result.get("model"))
    if stats.get("model") and stats.get("backend"):
        screen.app.loaded[stats["model"]] = stats["backend"]
    screen.status_bar.set(stats=stats)
    screen.update_model_status()
    reason = result.get("finish_reason")
    if reason == "cancelled":
        view.set_note("cancelled")
    elif stats.get("context_full"):
        view.set_note("stopped: the context window is full")
    elif reason == "length":
        view.set_note("stopped at max_tokens")
    session = screen.session
    if session is not None and not session.get("title") and prompt.strip():
        updated = await client.call("sessions.update", {"id": session["id"],
                                                        "title": title_from_prompt(prompt)})
        session["title"] = updated.get("title")
        screen.sub_title = session_title(session)
    await session_flows.refresh(screen)


async def regenerate(screen: "ChatScreen") -> None:
    """Drop the last user message and what follows it (``sessions.rewind``), then send it again."""
    client, sid = screen.client, screen.session["id"]
    try:
        data = await client.call("sessions.get", {"id": sid})
        users = [m for m in data.get("messages", []) if m["role"] == "user"]
        if not users:
            screen.notify("Nothing to regenerate in this session yet.")
            return
        last = users[-1]
        try:
            await client.call("sessions.rewind", {"id": sid, "message_id": last["id"]})
        except RPCError as exc:
            if exc.code == ErrorCode.METHOD_NOT_FOUND:
                screen.notify("This daemon cannot regenerate (it has no sessions.rewind); upgrade it.",
                              severity="error")
                return
            raise
        await session_flows.open_session(screen, sid)
    except RPCError as exc:
        screen.notify(f"Regenerate failed: {exc.message}", severity="error")
        return
    except ConnectionError:
        screen.notify("Not connected to the daemon.", severity="error")
        return
    screen.busy = True
    screen.refresh_bindings()
    screen.run_flow(send, last["content"], group="chat")
