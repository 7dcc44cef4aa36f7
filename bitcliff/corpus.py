"""Plain English prose from a MediaWiki XML export (the embedded Wikipedia corpus,
docs/architecture.md section 3).

Two steps, both pure functions of their input:

* :func:`iter_articles` walks the XML export and yields the wikitext of every article
  (main namespace, not a redirect);
* :func:`strip_markup` turns one article's wikitext into clean text: one paragraph, heading
  or list item per line, no templates, tables, references, files, categories, links
  markup, HTML or quote marks; appendix sections (References, See also, External links...)
  and headings left with no text under them are dropped.

:func:`dump_to_text` chains them and separates articles by one blank line, so a blank line
in the result always means "next article".

The stripper is deliberately simple (no template expansion, no parser functions): what a
template would have rendered is dropped, which loses a few inline values (dates, unit
conversions) but never leaves markup behind.  Bump :data:`STRIP_VERSION` whenever the output
changes, so cached corpora are rebuilt and perplexities stay comparable.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import IO, Iterator

STRIP_VERSION = 1

# Trailing appendix sections: lists of citations and links, not prose.  Everything from such
# a heading to the next heading of the same or a higher level is dropped.
APPENDIX_SECTIONS = frozenset(
    {
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "see also",
        "notes and references",
    }
)

# Link namespaces whose targets are not part of the running text.
_DROP_NAMESPACES = frozenset({"file", "image", "category", "media"})
# `[[de:Anarchismus]]` style interlanguage links (a language code, no label).
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{2,8})*:[^|]*$")
# Tags whose content is not prose (formulas, image lists, code, generated reference lists).
_DROP_CONTENT_TAGS = (
    "ref",
    "math",
    "chem",
    "ce",
    "gallery",
    "timeline",
    "imagemap",
    "references",
    "score",
    "syntaxhighlight",
    "source",
    "graph",
    "mapframe",
)

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SELF_CLOSING_DROP = re.compile(
    r"<(?:%s)\b[^>]*/>" % "|".join(_DROP_CONTENT_TAGS), re.IGNORECASE
)
_PAIRED_DROP = re.compile(
    r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_CONTENT_TAGS), re.IGNORECASE | re.DOTALL
)
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]+(?:[ \t]+([^\]\n]*))?\]")
# A bare URL, without the sentence punctuation that may follow it.
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\]]*[^\s<>\].,;:!?)'\"]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_MARKERS = re.compile(r"^[*#:;]+\s*")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_SPACE_AFTER_OPEN = re.compile(r"\( +")


def strip_markup(wikitext: str) -> str:
    """Turn one article's wikitext into plain text.

    Args:
        wikitext: MediaWiki markup of one page, as it appears in an XML export (already
            XML-unescaped, so ``<ref>`` is a literal tag and ``&nbsp;`` a literal entity).
    Returns:
        The prose: one paragraph, heading or list item per line, single spaces, no empty
        lines, no leading or trailing whitespace.  Empty if nothing textual is left.
    """
    text = _COMMENT.sub("", wikitext)
    # References first: their content (citation templates, URLs) is never prose, and removing
    # them whole is cheaper and safer than cleaning what is inside.
    text = _SELF_CLOSING_DROP.sub("", text)
    text = _PAIRED_DROP.sub("", text)
    text = _remove_balanced(text, "{{", "}}")
    # Tables after templates: template arguments may contain "|}" that is not a table end.
    text = _remove_balanced(text, "{|", "|}")
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _LINE_BREAK_TAG.sub(" ", text)
    text = _ANY_TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    return "\n".join(_clean_lines(text))


def _clean_lines(text: str) -> Iterator[str]:
    """Yield the non-empty, normalized lines of ``text``.

    Appendix sections are dropped, and so are headings left without any text under them
    (sections that held only templates, tables or galleries).
    """
    skip_level = 0  # heading level of the appendix section being skipped, 0 when none
    pending: list[tuple[int, str]] = []  # headings not yet followed by any text
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            title = _normalize(heading.group(2))
            skip_level = level if title.lower() in APPENDIX_SECTIONS else 0
            pending = [(lvl, t) for lvl, t in pending if lvl < level]
            if title and not skip_level:
                pending.append((level, title))
            continue
        if skip_level or line.startswith("----"):
            continue
        line = _normalize(_LIST_MARKERS.sub("", line))
        if line:
            yield from (t for _, t in pending)
            pending = []
            yield line


def _normalize(line: str) -> str:
    """Decode entities, collapse spaces and tidy what removed markup left around punctuation."""
    line = html.unescape(line)
    line = _SPACES.sub(" ", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACE_AFTER_OPEN.sub("(", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def _split_balanced(text: str, opener: str, closer: str) -> list[tuple[bool, str]]:
    """Cut ``text`` at its outermost balanced ``opener ... closer`` spans, nesting included.

    Returns:
        ``(is_span, content)`` pieces in order: kept text, or a span's content without its
        outer delimiters.  An opener that is never closed, or a closer without an opener, is
        dropped on its own, so a stray bracket cannot swallow the rest of an article.
    """
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    pieces: list[tuple[bool, str]] = []
    pos = 0  # start of the text not yet emitted
    while True:
        depth = 0
        span_start = 0
        for match in token.finditer(text, pos):
            if match.group() == opener:
                if depth == 0:
                    pieces.append((False, text[pos : match.start()]))
                    span_start = match.start()
                    pos = span_start
                depth += 1
            elif depth > 0:
                depth -= 1
                if depth == 0:
                    pieces.append((True, text[span_start + len(opener) : match.start()]))
                    pos = match.end()
            else:
                pieces.append((False, text[pos : match.start()]))
                pos = match.end()
        if depth == 0:
            pieces.append((False, text[pos:]))
            return pieces
        # The outermost opener was never closed: drop it alone and scan again after it.
        pos = span_start + len(opener)


def _remove_balanced(text: str, opener: str, closer: str) -> str:
    """``text`` without its balanced ``opener ... closer`` spans (see :func:`_split_balanced`)."""
    return "".join(piece for is_span, piece in _split_balanced(text, opener, closer) if not is_span)


def _replace_links(text: str) -> str:
    """Replace ``[[...]]`` links by what a reader sees; drop files, categories, interlanguage.

    Returns:
        ``text`` with every internal link resolved, nested links (in file captions or labels)
        included.
    """
    return "".join(
        _render_link(piece) if is_span else piece
        for is_span, piece in _split_balanced(text, "[[", "]]")
    )


def _render_link(inner: str) -> str:
    """The visible text of one internal link, given what lies between ``[[`` and ``]]``."""
    target, bar, label = inner.partition("|")
    target = target.strip()
    explicit = target.startswith(":")  # [[:Category:X]] links to the page instead of tagging
    name = target.lstrip(":").strip()
    namespace = name.partition(":")[0].strip().lower() if ":" in name else ""
    if not explicit and namespace in _DROP_NAMESPACES:
        return ""
    if not explicit and not bar and _INTERLANGUAGE.match(name):
        return ""
    if bar:
        if label.strip():
            return _replace_links(label)
        # The "pipe trick": [[Paris, Texas|]] shows "Paris", [[Pluto (planet)|]] shows "Pluto".
        shown = name.split(":", 1)[-1] if namespace else name
        return re.sub(r"\s*\(.*\)$", "", shown).split(",")[0]
    return name


def iter_articles(xml_file: IO[bytes]) -> Iterator[tuple[str, str]]:
    """Walk a MediaWiki XML export and yield its articles.

    Args:
        xml_file: a binary file object with the export (any schema version: tags are matched
            without their namespace).
    Returns:
        An iterator of ``(title, wikitext)`` for pages in the main namespace (``ns`` 0) that
        are not redirects, in file order.
    """
    for _, element in ET.iterparse(xml_file, events=("end",)):
        if _local(element.tag) != "page":
            continue
        title, ns, text, redirect = "", "0", "", False
        for child in element.iter():
            tag = _local(child.tag)
            if tag == "title":
                title = child.text or ""
            elif tag == "ns":
                ns = (child.text or "").strip()
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = child.text or ""
        # Old exports have no <ns>; their redirects are only marked in the text.
        if not redirect and text.lstrip()[:9].upper() == "#REDIRECT":
            redirect = True
        element.clear()  # keep memory flat on large dumps
        if ns == "0" and not redirect and text:
            yield title, text


def _local(tag: str) -> str:
    """An XML tag without its ``{namespace}`` prefix."""
    return tag.rpartition("}")[2]


def dump_to_text(xml_file: IO[bytes]) -> str:
    """The clean text of every article of a MediaWiki XML export.

    Returns:
        Articles in file order, each as :func:`strip_markup` gives it, separated by one blank
        line; articles with no text left are skipped.  Ends with a newline.
    """
    articles = (strip_markup(text) for _, text in iter_articles(xml_file))
    return "\n\n".join(a for a in articles if a) + "\n"
