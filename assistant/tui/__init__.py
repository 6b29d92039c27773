"""The terminal UI (``assistant`` with no arguments, or ``assistant tui``).

This package's ``__init__`` imports nothing: the config schema reads
``assistant.tui.keys`` and must not pull Textual in. ``run()`` (in ``app``)
is the entry point.
"""
