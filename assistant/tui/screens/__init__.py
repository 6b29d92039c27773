"""The TUI's screens: settings, plugins, help, and small dialogs."""
