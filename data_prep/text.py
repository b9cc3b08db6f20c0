"""Item text: clean raw catalogue fields and render the encoder input from a template.

Cleaning (``clean_text``): HTML entities are unescaped (twice: some Amazon fields are escaped
twice), HTML markup is removed -- HTML tags (``<br>``, ``<p class=x>``, ``</div>``, comments;
``<script>``/``<style>`` with their content) and any tag the text also closes (``<x>..</x>``), so
``Screws <M3> pack`` or ``a < b > c`` keep their text --, Python-list reprs (MiniOneRec
``"['...']"``) are unwrapped and spaces squeezed.
Text shaped like a SID token (``<a_12>``) is rewritten as ``[a_12]``: those strings are added
to the LLM vocabulary, and an item title must never tokenize into another item's SID.

A value that is not text -- a JSON object, a set, NaN -- is ``NotText``; loaders report it as a
DataError naming the file, line or key and field (``field_text``) instead of storing its repr.
"""

from __future__ import annotations

import ast
import html
import math
import os
import re
import string

from data_prep.dataset import Item
from data_prep.io import DataError

DEFAULT_TEMPLATE = "{title}. Brand: {brand}. Categories: {categories}. {description}"

_HTML_TAGS = (
    "a|abbr|b|big|blockquote|body|br|center|cite|code|col|colgroup|dd|del|dfn|div|dl|dt|em|font|"
    "h[1-6]|head|hr|html|i|img|ins|kbd|li|link|meta|nobr|ol|p|pre|q|s|samp|small|span|strike|"
    "strong|sub|sup|table|tbody|td|tfoot|th|thead|title|tr|tt|u|ul|var|wbr|iframe|input|label|"
    "form|button|select|option|section|article|header|footer|nav|figure|figcaption|picture|source"
)
# A tag: the name, then whitespace, "/" or ">" (so "<a_12>" or "<M3>" are not tags).
_TAG = re.compile(rf"</?(?:{_HTML_TAGS})(?=[\s/>])[^<>]*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
# Any other name is markup only when the text also closes it (<ulu>..</ulu> in a MiniOneRec
# description): "Screws <M3> pack" has no </M3> and keeps its text.
_CLOSING = re.compile(r"</([A-Za-z][\w-]*)\s*>")
_SCRIPT = re.compile(r"<(script|style)(?=[\s>])[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_SID_LIKE = re.compile(r"<([a-z])_(\d+)>")
_SPACE = re.compile(r"\s+")


class NotText(ValueError):
    """A field value that cannot be item text (a JSON object, a set, NaN, ...)."""


def clean_text(value: object) -> str:
    """Text, a number, or a (nested) list of them -> one cleaned string ("" for None).

    Raises ``NotText`` for anything else (a dict would otherwise be stored as its repr).
    """
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(t for t in (clean_text(v) for v in value) if t)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotText(f"{value!r} is not text")
        return repr(value)
    if isinstance(value, int):  # bool included: "True"
        return str(value)
    if not isinstance(value, str):
        raise NotText(
            f"expected text, a number or a list of them, got {type(value).__name__} {_short(value)}"
        )
    text = value.strip()
    if text.startswith("[") and text.endswith("]") and ("'" in text or '"' in text):
        try:
            parsed = ast.literal_eval(text)  # literal_eval only parses literals, never runs code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            try:
                return clean_text(parsed)
            except NotText:
                pass  # not a list of strings after all: keep the text as written
    for _ in range(2):  # some Amazon fields are escaped twice (&amp;amp;)
        text = html.unescape(text)
    text = _SCRIPT.sub(" ", text)
    text = _TAG.sub(" ", text)
    closed = set(_CLOSING.findall(text))
    if closed:
        names = "|".join(re.escape(n) for n in sorted(closed))
        text = re.sub(rf"</?(?:{names})(?=[\s/>])[^<>]*>", " ", text)
    text = _SID_LIKE.sub(r"[\1_\2]", text)
    return _SPACE.sub(" ", text).strip()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split_categories(value: object) -> list[str]:
    """Categories arrive as a list, a list of lists (Amazon 2014) or a comma-joined string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        parts: list[object] = list(value.split(","))
    elif isinstance(value, list | tuple):
        parts = []
        for v in value:
            parts.extend(v if isinstance(v, list | tuple) else [v])
    else:
        raise NotText(
            f"expected a list of categories or a string, got {type(value).__name__} {_short(value)}"
        )
    out: list[str] = []
    for p in parts:
        p = clean_text(p)
        if p and p not in out:
            out.append(p)
    return out


def field_text(
    value: object,
    path: str | os.PathLike,
    *,
    line: int | None = None,
    key: str | None = None,
    field: str,
    categories: bool = False,
) -> str | list[str]:
    """``clean_text`` (or ``split_categories``) whose ``NotText`` is a DataError naming the place."""
    try:
        return split_categories(value) if categories else clean_text(value)
    except NotText as e:
        raise DataError(path, str(e), line=line, key=key, field=field) from None


def truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,.;") + "..."


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template uses; only plain ``{name}`` fields are allowed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"item text template {template!r}: {e}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"item text template {template!r}: field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain {{name}}"
            )
        names.append(name)
    return names


def render_item_text(
    item: Item, template: str = DEFAULT_TEMPLATE, max_description_chars: int = 300, max_chars: int = 1000
) -> str:
    """Fill the template; empty fields and their dangling labels are dropped."""
    names = template_fields(template)
    fields = {
        "title": item.title.rstrip(" ."),
        "brand": item.brand.rstrip(" ."),
        "categories": ", ".join(item.categories),
        "description": truncate(item.description, max_description_chars),
    }
    for name in names:
        if name not in fields and name in item.extra:
            try:
                fields[name] = clean_text(item.extra[name])
            except NotText as e:
                raise ValueError(f"item {item.raw_id!r} field {name!r}: {e}") from None
    unknown = [n for n in names if n not in fields]
    if unknown:
        available = sorted({"title", "brand", "categories", "description", *item.extra})
        raise ValueError(f"item text template names unknown field {unknown[0]!r}; available: {available}")
    text = template.format(**fields)
    # Drop labels whose value was empty ("Brand: ." -> "").
    text = re.sub(r"\b[A-Z][a-z]+: \.\s*", "", text)
    text = _SPACE.sub(" ", text).strip(" .")
    return truncate(text, max_chars)
