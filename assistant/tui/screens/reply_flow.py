"""Sending a message and streaming the reply into the chat; regenerating the last one.

:func:`send` runs in a worker of the chat screen (group ``chat``), started
by Enter in the input (``ChatScreen.submitted``) or by :func:`regenerate`.
Attachments go with the message as content parts (``attachments.message_content``):
the daemon gives them to the model natively or as a fallback skill's text, and
the reply's ``stats.media`` says which; the user's message then says it too
("image: OCR text"). The reply streams into a message view at most
``STREAM_FPS`` times a second; its figures go to the status line, and the
session gets its title from the first message. A daemon error ends up as an
error message in the chat (a refused message keeps its attachments and its
text, to send again or change), a lost connection as a note on the reply.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Sequence

from assistant.protocol import ErrorCode, RPCError
from assistant.tui import attachments
from assistant.tui.format import session_title, title_from_prompt
from assistant.tui.keys import display_key
from assistant.tui.screens import session_flows
from assistant.tui.widgets.chat import ChatInput, ChatView, MessageView

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
STREAM_FPS = 15


def chat_params(session: dict[str, Any], prompt: str | list[dict[str, Any]]) -> dict[str, Any]:
    """The ``chat`` request for ``prompt`` (text, or content parts) in ``session``: its
    sampling settings and drafter."""
    settings = session.get("settings") or {}
    params: dict[str, Any] = {"prompt": prompt, "session": session["id"]}
    for key in SAMPLING_KEYS:
        if settings.get(key) is not None:
            params[key] = settings[key]
    if settings.get("draft"):
        params["draft"] = settings["draft"]
    return params


async def send(screen: "ChatScreen", prompt: str | list[dict[str, Any]],
               atts: Sequence[attachments.Attachment] | attachments.Attachment | None = None,
               show_user: bool = True) -> None:
    """Send ``prompt`` (text, or a message's content parts) with ``atts`` and stream the reply
    into the chat. The caller has set ``screen.busy``; this clears it when the reply is over."""
    atts = [atts] if isinstance(atts, attachments.Attachment) else list(atts or [])
    text = prompt if isinstance(prompt, str) else attachments.content_text(
        [p for p in prompt if isinstance(p, dict) and p.get("type") == "text"])
    content = attachments.message_content(prompt, atts) if isinstance(prompt, str) else prompt
    kinds = attachments.content_kinds(content)
    chat = screen.query_one(ChatView)
    client = screen.client
    view: MessageView | None = None
    user_view: MessageView | None = None
    try:
        chat.anchor()
        if show_user:
            user_view = await chat.add(MessageView("user", content))
        view = await chat.add(MessageView("assistant", "", model=screen.current_model()))
        result = await _stream_reply(screen, client, view, content, atts)
        title = text or " ".join(a.label for a in atts) or attachments.content_text(content)
        await _reply_done(screen, client, result, view, user_view, title)
        if user_view is not None and kinds:
            user_view.set_note(attachments.media_note(kinds, (result.get("stats") or {}).get("media")))
    except RPCError as exc:
        replied = view is not None and bool(view.text)
        if view is not None:
            await view.end_stream()
            if not view.text:
                await view.remove()
        if atts and not replied:
            # Refused (a medium the model cannot take, a file the daemon cannot read, busy...):
            # nothing of it was kept, so the files and the words wait to be sent again or changed.
            _keep_for_retry(screen, text, atts)
            if user_view is not None:
                user_view.set_note("not sent")
            await chat.add(MessageView("error", f"{exc.message}\n(The attachment is kept: send again, or press "
                                                f"{display_key(screen.keys['cancel'])} to remove it.)"))
        else:
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


def _keep_for_retry(screen: "ChatScreen", text: str, atts: list[attachments.Attachment]) -> None:
    """Put a refused message's attachments back (before any attached since) and its words
    back in the input when the user has not started another message."""
    screen.attachments[:0] = atts
    screen.show_attachment()
    chat_input = screen.query_one(ChatInput)
    if not chat_input.text.strip() and text.strip():
        chat_input.text = text
        chat_input.move_cursor(chat_input.document.end)


async def _stream_reply(screen: "ChatScreen", client: Any, view: MessageView, prompt: str | list[dict[str, Any]],
                        atts: Sequence[attachments.Attachment] = ()) -> dict[str, Any]:
    """Stream the reply to ``prompt`` into ``view`` (the cancel key can stop it); the daemon's result."""
    cancel = f"{display_key(screen.keys['cancel'])} cancels"
    if atts:  # the daemon reads the files (or has them read) before the first token
        names = ", ".join(a.name for a in atts)
        screen.status_bar.set(busy=f"sending {names}… ({cancel})")
    else:
        screen.status_bar.set(busy=f"generating… ({cancel})")
    stream = await client.chat(**chat_params(screen.session, prompt))
    screen.stream = stream
    screen.refresh_bindings()
    view.start_stream()
    # chunks(): every delta that arrived while the screen was repainting, in one piece
    first = True
    async for delta in (stream.chunks() if hasattr(stream, "chunks") else stream):
        if first and atts:
            screen.status_bar.set(busy=f"generating… ({cancel})")
        first = False
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
    # A message with media is sent again with its parts (its media named by sha256: the daemon
    # keeps them), not just its text.
    screen.run_flow(send, last.get("parts") or last["content"], group="chat")
