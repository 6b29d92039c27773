"""The terminal UI (``assistant`` with no arguments, or ``assistant tui``).

``run()`` (in ``app``) is the entry point. ``app`` holds the Textual app (the
connection, themes, keys, screens); ``screens/chat.py`` the chat screen and
the ``*_flow(s)`` modules beside it what its actions do; ``widgets/`` the
one-job widgets. This package's ``__init__`` imports nothing, so ``assistant``
commands that never start the TUI do not load Textual. Nothing outside the
TUI imports it: the config reads the actions table from ``assistant.keymap``.
"""
