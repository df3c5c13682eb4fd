"""Markdown of chat answers as the HTML subset Qt's text browser renders: CommonMark (markdown-it-py), code
blocks in a monospace font with syntax colours (Pygments, inline styles: Qt rich text has no CSS classes)."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

CODE_BACKGROUND = "#f4f4f6"
MONOSPACE = "'DejaVu Sans Mono', 'Menlo', 'Consolas', monospace"
_FORMATTER = HtmlFormatter(nowrap=True, noclasses=True, style="friendly")


def _lexer(code: str, language: str):
    try:
        return get_lexer_by_name(language) if language else guess_lexer(code)
    except ClassNotFound:
        return None


def highlight_code(code: str, language: str) -> str:
    lexer = _lexer(code, language.strip().split()[0] if language.strip() else "")
    if lexer is None or lexer.name == "Text only":
        return html.escape(code)
    return highlight(code, lexer, _FORMATTER).rstrip("\n")


def _fence(_renderer, tokens, idx, _options, _env) -> str:
    token = tokens[idx]
    code = token.content.rstrip("\n")
    # One <pre> with plain newlines: Qt turns it into one block per line with no paragraph spacing between them.
    return (f'<table width="100%" cellpadding="6" cellspacing="0" style="background-color:{CODE_BACKGROUND}">'
            f'<tr><td><pre style="font-family:{MONOSPACE}; margin:0">{highlight_code(code, token.info)}</pre>'
            "</td></tr></table>\n")


def _code_inline(_renderer, tokens, idx, _options, _env) -> str:
    return (f'<code style="font-family:{MONOSPACE}; background-color:{CODE_BACKGROUND}">'
            f"{html.escape(tokens[idx].content)}</code>")


_md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True}).enable("table")
_md.add_render_rule("fence", _fence)
_md.add_render_rule("code_block", _fence)
_md.add_render_rule("code_inline", _code_inline)


def to_html(text: str) -> str:
    """HTML for one message. Raw HTML in the text is shown as text, never interpreted."""
    return _md.render(text)
