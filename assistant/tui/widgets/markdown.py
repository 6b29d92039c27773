"""The Markdown widget of replies: Textual's, with code highlighting memoised.

Textual's ``MarkdownFence`` highlights its code (pygments) when it is built
and again on every style update, which happens several times while the app
starts and on every repaint of a streaming reply. The result depends only on
the code, the language and the theme's darkness, so it is cached here. This
module is imported when the first reply is shown (it pulls in markdown-it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from textual.widgets.markdown import Markdown, MarkdownFence

_CACHE_SIZE = 256


class CachedFence(MarkdownFence):
    _cache: "OrderedDict[tuple[str, str, bool, bool], Any]" = OrderedDict()

    @classmethod
    def highlight(cls, code: str, language: str, ansi: bool = False, dark: bool = False) -> Any:
        key = (code, language or "", ansi, dark)
        hit = cls._cache.get(key)
        if hit is None:
            hit = super().highlight(code, language, ansi=ansi, dark=dark)
            cls._cache[key] = hit
            if len(cls._cache) > _CACHE_SIZE:
                cls._cache.popitem(last=False)
        else:
            cls._cache.move_to_end(key)
        return hit


class ChatMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "fence": CachedFence, "code_block": CachedFence}
    DEFAULT_CSS = """
    ChatMarkdown {
        padding: 0;
        margin: 0;
    }
    """
