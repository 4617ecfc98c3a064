"""HTML → Markdown for chat exports, and removal of what the export UI leaves behind.

ShareGPT assistant turns are the HTML of the ChatGPT page: a `<div class="markdown prose">`
wrapper, and code blocks whose header holds the language label and a "Copy code" button. Any
converter (html-to-markdown here, markdownify in FastChat) turns that header into a first line
like "pythonCopy code" inside the fence; `clean_markdown` turns it back into ```python.
html-to-markdown (Rust core) was ~20× faster than markdownify on this HTML.
"""

from __future__ import annotations

import re
from functools import lru_cache

# A value is converted only when it starts with a block tag: exported assistant turns always do,
# while user turns are plain text in which "<b>" or "a < b" must stay as typed.
_HTML_START = re.compile(r"\s*(?:<div[\s>]|<p[\s>]|<pre[\s>]|<ol[\s>]|<ul[\s>]|<table[\s>]|<h[1-6][\s>]|<blockquote[\s>]|<span[\s>])", re.I)
# "```\npythonCopy code\n" (and variants without the newline or the language) → "```python\n";
# a fence that held only the button ("```\nCopy code\n```") goes away.
_COPY_CODE_FENCE = re.compile(r"```[ \t]*\n?[ \t]*([\w#+.\-]*)[ \t]*(?:Copy code)+[ \t]*\n?(\s*```[ \t]*\n?)?")
# The "regenerate" counter the page shows at the top of a turn ("2 / 3"), glued to the text or
# on its own line; "1 / 2 cup of flour" (a space after the counter) is real text and stays.
_COUNTER = re.compile(r"\A\s*(\d{1,3}) / (\d{1,3})(?:[ \t]*\n\s*|(?=[^\s\d/]))")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_STRAY_DIV = re.compile(r"[ \t]*</?div\b[^>]*>", re.I)
_BLANK_RUNS = re.compile(r"\n{3,}")
_FENCE_SPLIT = re.compile(r"(^```.*?^```[ \t]*$)", re.M | re.S)


def looks_like_html(value: str) -> bool:
    return bool(_HTML_START.match(value))


@lru_cache(maxsize=1)
def _converter():
    """html-to-markdown's `convert`, with the options translated for its Rust core once: the
    public wrapper re-translates them on every call, which cost more than converting a turn."""
    import html_to_markdown
    from html_to_markdown import ConversionOptions

    # One bullet style at every depth; no metadata extraction (it costs time and is not used).
    options = ConversionOptions(extract_metadata=False, bullets="-", escape_asterisks=False, escape_underscores=False)
    try:
        from html_to_markdown import api

        native, rust_convert = api._to_rust_conversion_options(options), api._rust.convert
        return lambda html: rust_convert(html=html, options=native, visitor=None).content
    except (ImportError, AttributeError, TypeError):  # a release without these internals
        return lambda html: html_to_markdown.convert(html, options).content


def html_to_markdown(value: str) -> str:
    """Convert one exported turn; plain text only loses the export residue."""
    if looks_like_html(value):
        value = _converter()(value)
    return clean_markdown(value)


def clean_markdown(text: str) -> str:
    if "Copy" in text:  # a cheap test first: most turns have no button residue at all
        text = _COPY_CHARS.sub("", _COPY_CODE_FENCE.sub(_fence, text))
    text = _strip_counter(text)
    if "<div" in text or "</div" in text or "\n\n\n" in text:
        text = _outside_code(text, lambda prose: _BLANK_RUNS.sub("\n\n", _STRAY_DIV.sub("", prose)))
    return text.strip()


def _fence(match: re.Match) -> str:
    return "" if match.group(2) is not None else f"```{match.group(1)}\n"


def _strip_counter(text: str) -> str:
    match = _COUNTER.match(text)
    if match and 1 <= int(match.group(1)) <= int(match.group(2)):
        return text[match.end():]
    return text


def _outside_code(text: str, fix) -> str:
    """Apply `fix` to the prose only: code blocks keep their blank lines and literal tags."""
    parts = _FENCE_SPLIT.split(text)
    return "".join(part if i % 2 else fix(part) for i, part in enumerate(parts))
