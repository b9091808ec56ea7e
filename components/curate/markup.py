"""HTML -> plain text with the standard library's tolerant `html.parser`.

Keeps what a reader sees: text of the body, paragraph/heading/list/table structure as line breaks,
`<pre>` blocks verbatim (code samples keep their indentation), entities decoded. Drops what a reader
does not see: scripts, styles, templates, comments, the document head except its <title>.
Malformed markup never raises; unclosed tags are simply ended by the end of input.
The result is laid out like curated text: lines without trailing spaces, at most one blank line in a
row, none at the start or end.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "object"}
_HEAD_ONLY = {"title", "meta", "link", "base", "style", "script", "noscript", "template", "head", "html"}
_BLOCK = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "nav",
    "aside",
    "main",
    "blockquote",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "title",
    "figure",
    "figcaption",
    "form",
    "fieldset",
    "address",
    "details",
    "summary",
    "caption",
}
_SPACES = re.compile(r"[ \t\r\n\f]+")
_BREAK_SPACES = re.compile(r" *\n *")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, bool]] = []  # (text, verbatim?)
        self.skip_depth = 0  # inside <script>, <style>, ...
        self.pre_depth = 0  # inside <pre>: whitespace is content
        self.in_title = False
        self.in_head = False  # text in <head> is not shown, except the <title>

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "head":
            self.in_head = True
        elif tag not in _HEAD_ONLY:
            self.in_head = False  # like browsers: the first body element ends an unclosed <head>
        if tag == "title":
            self.in_title = True
        elif tag in _SKIP:
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in _BLOCK:
            self.parts.append(("\n", False))
        elif tag == "td" or tag == "th":
            self.parts.append((" ", False))

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag in _BLOCK:
            self.parts.append(("\n", False))

    def handle_endtag(self, tag: str) -> None:
        if tag == "head":
            self.in_head = False
        if tag == "title":
            self.in_title = False
        elif tag in _SKIP and self.skip_depth:
            self.skip_depth -= 1
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _BLOCK:
            self.parts.append(("\n", False))

    def handle_data(self, data: str) -> None:
        if (self.skip_depth or self.in_head) and not self.in_title:
            return
        self.parts.append((data, True) if self.pre_depth else (_SPACES.sub(" ", data), False))


def html_to_text(html: str) -> str:
    """The visible text of an HTML document: the one HTML-to-text rule of lmforge (curation, tokenizer
    training, scripts/fetch_corpora.py)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    # Outside <pre>, block boundaries became "\n" and spaces next to them are layout, not content;
    # <pre> text is joined verbatim.
    out: list[str] = []
    flow: list[str] = []
    for text, verbatim in parser.parts:
        if verbatim:
            out.append(_BREAK_SPACES.sub("\n", "".join(flow)))
            flow = []
            out.append(text)
        else:
            flow.append(text)
    out.append(_BREAK_SPACES.sub("\n", "".join(flow)))
    # The layout curated text has (normalize.py): no trailing spaces, at most one blank line in a row,
    # no blank lines at either end. Curation and tokenizer training both read HTML through this
    # function, so the same page gives both stages the same text.
    lines: list[str] = []
    for line in "".join(out).split("\n"):
        line = line.rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)
