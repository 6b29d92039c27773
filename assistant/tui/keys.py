"""The TUI's key bindings, built from the table of actions in ``assistant.keymap``.

The table (ids, default keys, descriptions) is shared with the config schema
(``tui.bindings``); this module adds what only the TUI needs: the keys in
effect once the config's bindings apply, how keys are shown, and which
screen runs each action. The app runs the app-wide actions (``APP_ACTIONS``);
the chat screen runs the rest. Both bind their keys with :func:`key_bindings`,
under the action's id, so ``App.set_keymap`` remaps every one of them.
"""

from __future__ import annotations

from typing import Iterable

from textual.binding import Binding

from assistant.keymap import ACTIONS, Action

__all__ = ["ACTIONS", "Action", "APP_ACTIONS", "BY_ID", "DEFAULT_KEYS", "display_key",
           "effective_keys", "key_bindings", "key_list"]

BY_ID = {a.id: a for a in ACTIONS}
DEFAULT_KEYS: dict[str, str] = {a.id: a.key for a in ACTIONS}

# Actions about the app rather than the conversation: they work on any screen the app shows.
APP_ACTIONS = frozenset({"plugins", "help", "reconnect", "quit"})


def key_bindings(ids: Iterable[str], namespace: str = "", show: bool | None = None) -> list[Binding]:
    """Textual bindings for these actions: their default keys, remapped by the app's keymap
    through their ids. ``namespace`` (``"app"``, ``"screen"``) prefixes the action, for a node
    whose keys run another node's actions; ``show``: in the footer (None: the action's ``footer``)."""
    prefix = f"{namespace}." if namespace else ""
    return [Binding(BY_ID[i].key, prefix + BY_ID[i].action, BY_ID[i].description,
                    show=BY_ID[i].footer if show is None else show, id=i) for i in ids]


def effective_keys(overrides: dict[str, str] | None) -> dict[str, str]:
    """The default keys with the config's ``tui.bindings`` applied (empty or null values keep the default)."""
    keys = dict(DEFAULT_KEYS)
    for action, key in (overrides or {}).items():
        if action in keys and key:
            keys[action] = ",".join(k.strip() for k in str(key).split(",") if k.strip())
    return keys


def key_list(keys: str) -> list[str]:
    """``"shift+enter,ctrl+j"`` -> ``["shift+enter", "ctrl+j"]``."""
    return [k.strip() for k in keys.split(",") if k.strip()]


def display_key(keys: str) -> str:
    """A key spec as people read it: ``ctrl+n`` -> ``Ctrl+N``."""
    out = []
    for k in key_list(keys):
        parts = k.split("+")
        out.append("+".join(p.capitalize() if len(p) > 1 else p.upper() for p in parts))
    return " / ".join(out)
