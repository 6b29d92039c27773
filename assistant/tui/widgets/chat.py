"""The conversation: message views, the scrolling chat view and the input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static, TextArea

from assistant.tui.attachments import content_text

if TYPE_CHECKING:  # Markdown (markdown-it, pygments) is imported when the first reply is shown
    from textual.widgets.markdown import MarkdownStream

ROLE_LABEL = {"user": "You", "assistant": "Assistant", "system": "System", "error": "Error", "info": "Note",
              "tool": "Tool"}


class MessageView(Vertical, can_focus=True):
    """One message. Focus it (click, or Tab) and press the copy key to copy it.

    ``text`` may be a message's content parts (a list, as sent or as the session keeps
    them): the view shows their text and a line naming each image or audio file."""

    BINDINGS = [Binding("alt+c", "screen.copy", "Copy message", id="copy")]  # the chat screen copies

    def __init__(self, role: str, text: str | list[Any] = "", *, message_id: int | None = None, note: str = "",
                 model: str | None = None, status: str = "complete", **kwargs: Any):
        classes = f"message -{role}" + (" -cancelled" if status == "cancelled" else "")
        super().__init__(classes=classes, **kwargs)
        self.role = role
        # the content as given (a string, or parts with their media)
        self.content: str | list[Any] = text
        self.text = text if isinstance(text, str) else content_text(text)
        self.message_id = message_id
        self.model = model
        self.note = note or ("cancelled" if status == "cancelled" else "")
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Static(self._header_text(), classes="message-header", markup=False)
        if self.role == "assistant":
            from assistant.tui.widgets.markdown import ChatMarkdown

            yield ChatMarkdown(self.text, classes="message-body")
        else:
            yield Static(Text(self.text), classes="message-body", markup=False)

    def _header_text(self) -> Text:
        label = ROLE_LABEL.get(self.role, self.role.title())
        text = Text(label, style="bold")
        if self.model and self.role == "assistant":
            text.append(f"  {self.model}", style="dim")
        if self.note:
            text.append(f"  [{self.note}]", style="italic")
        return text

    def set_note(self, note: str) -> None:
        self.note = note
        if self.is_mounted:
            self.query_one(".message-header", Static).update(self._header_text())
        self.set_class(note == "cancelled", "-cancelled")

    def set_model(self, model: str | None) -> None:
        self.model = model
        if self.is_mounted:
            self.query_one(".message-header", Static).update(self._header_text())

    # -- streaming (assistant messages) -------------------------------------

    def start_stream(self) -> MarkdownStream:
        from textual.widgets import Markdown

        self.add_class("-streaming")
        self._stream = Markdown.get_stream(self.query_one(Markdown))
        return self._stream

    async def write(self, delta: str) -> None:
        self.text += delta
        if self._stream is not None:
            await self._stream.write(delta)

    async def end_stream(self, final_text: str | None = None) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("-streaming")
        if final_text is not None and final_text != self.text:
            self.text = final_text
            await self.query_one(".message-body").update(final_text)

    async def set_text(self, text: str) -> None:
        self.text = text
        body = self.query_one(".message-body")
        if self.role == "assistant":
            await body.update(text)
        else:
            body.update(Text(text))


class ChatView(VerticalScroll):
    """The messages of the current session; stays at the bottom while a reply
    streams, unless the user scrolls up (Textual's anchor)."""

    def on_mount(self) -> None:
        self.anchor()

    async def add(self, view: MessageView) -> MessageView:
        await self.mount(view)
        return view

    async def clear(self) -> None:
        await self.remove_children()

    def messages(self) -> list[MessageView]:
        return list(self.query(MessageView))

    def last(self, role: str | None = None) -> MessageView | None:
        for view in reversed(self.messages()):
            if role is None or view.role == role:
                return view
        return None


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter / Ctrl+J insert a new line (the keys
    come from ``tui.bindings``), Up on the first line / Down on the last recall
    earlier messages."""

    class Submitted(Message):
        def __init__(self, chat_input: "ChatInput", text: str):
            super().__init__()
            self.chat_input = chat_input
            self.text = text

        @property
        def control(self) -> "ChatInput":
            return self.chat_input

    def __init__(self, *, keys: dict[str, str], history: list[str] | None = None, **kwargs: Any):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True, **kwargs)
        from assistant.tui.keys import key_list

        self.send_keys = set(key_list(keys["send"]))
        self.newline_keys = set(key_list(keys["newline"]))
        self.prev_keys = set(key_list(keys["history_previous"]))
        self.next_keys = set(key_list(keys["history_next"]))
        self.input_history: list[str] = list(history or [])
        self._history_index: int | None = None  # None: editing a new message
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key in self.send_keys:
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if key in self.newline_keys:
            event.stop()
            event.prevent_default()
            if not self.read_only:
                start, end = self.selection
                self.replace("\n", start, end, maintain_selection_offset=False)
            return
        if key in self.prev_keys and self.cursor_at_first_line and self.input_history:
            event.stop()
            event.prevent_default()
            self.recall(-1)
            return
        if key in self.next_keys and self.cursor_at_last_line and self._history_index is not None:
            event.stop()
            event.prevent_default()
            self.recall(+1)
            return
        await super()._on_key(event)

    def recall(self, step: int) -> None:
        if self._history_index is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self.input_history) - 1
        else:
            index = self._history_index + step
        if index < 0:
            return
        if index >= len(self.input_history):
            self._history_index = None
            self.text = self._draft
        else:
            self._history_index = index
            self.text = self.input_history[index]
        self.move_cursor(self.document.end)

    def remember(self, text: str) -> None:
        if text.strip() and (not self.input_history or self.input_history[-1] != text):
            self.input_history.append(text)
        self._history_index = None
        self._draft = ""
