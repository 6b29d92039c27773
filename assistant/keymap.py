"""The terminal UI's actions and their default keys: pure data, no imports.

The config schema reads this table to offer ``tui.bindings`` (action -> key),
so every action here is a config key and ``config.example.yaml`` documents
it. The TUI (``assistant.tui.keys``) builds its key bindings, footer, help
screen and command palette from the same table. It lives outside both the
``config`` and the ``tui`` packages: loading the config never imports the
TUI, and starting the TUI without a config file never imports the config
(YAML and the schema).

Keys use Textual's names (``ctrl+n``, ``f2``, ``escape``, ``alt+c``); several
keys for one action are separated by commas (``shift+enter,ctrl+j``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One action of the TUI: its config key, default keys and the words shown for it."""

    id: str  # the config key and the Textual binding id
    key: str  # default key(s)
    description: str  # shown in the footer, the help screen and the command palette
    action: str  # the Textual action it runs ("" for keys the chat input handles itself)
    footer: bool = True  # shown in the footer (False: shown when the widget it is about has focus)
    help: str = ""  # longer text for the help screen and the palette


ACTIONS: tuple[Action, ...] = (
    # The chat input handles these itself (they only act while it has focus).
    Action("send", "enter", "Send", "", footer=False, help="Send the message."),
    Action("newline", "shift+enter,ctrl+j", "New line", "", footer=False,
           help="Insert a new line (Shift+Enter needs a terminal that reports it)."),
    Action("history_previous", "up", "Previous input", "", footer=False,
           help="Recall the previous message you sent (from the first line)."),
    Action("history_next", "down", "Next input", "", footer=False,
           help="Recall the next message you sent (from the last line)."),
    # Actions with a key of their own.
    Action("cancel", "escape", "Cancel", "cancel", help="Stop the reply being generated (it is kept as it is)."),
    Action("regenerate", "ctrl+r", "Regen", "regenerate",
           help="Replace the last reply with a new one to the same message."),
    Action("copy", "alt+c", "Copy", "copy",
           help="Copy the selected message or the last reply (OSC 52: works over ssh)."),
    Action("attach", "ctrl+o", "Attach", "attach", help="Attach an image or audio file to the next message."),
    Action("new_session", "ctrl+n", "New", "new_session", help="Start a new chat session."),
    Action("rename_session", "f2", "Rename", "rename_session", footer=False, help="Rename the current session."),
    Action("delete_session", "f8", "Delete", "delete_session", footer=False,
           help="Delete the current session (asks first)."),
    Action("export_session", "ctrl+s", "Export", "export_session", footer=False,
           help="Export the current session to a Markdown file."),
    Action("toggle_sidebar", "ctrl+b", "Sessions", "toggle_sidebar", help="Show or hide the sessions sidebar."),
    Action("toggle_activity", "ctrl+t", "Activity", "toggle_activity",
           help="Show or hide the live activity panel (daemon and automations)."),
    Action("settings", "f3", "Settings", "settings",
           help="Session settings: system prompt, sampling, model, backend, drafter."),
    Action("plugins", "f4", "Plugins", "plugins", help="Plugins and their status, and the skills they offer."),
    Action("help", "f1", "Help", "help", help="This list of keys."),
    Action("reconnect", "f9", "Reconnect", "reconnect", footer=False,
           help="Connect to the daemon again, starting it if it is not running."),
    Action("quit", "ctrl+q", "Quit", "quit", help="Leave the TUI (the daemon keeps running)."),
)
