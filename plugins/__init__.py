"""Built-in plugins (filewatch, vision, audio), loaded exactly like third-party ones."""
