"""Item text: clean raw catalogue fields and render the encoder input from a template."""

from __future__ import annotations

import ast
import html
import re

from data_prep.dataset import Item

DEFAULT_TEMPLATE = "{title}. Brand: {brand}. Categories: {categories}. {description}"

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(value: object) -> str:
    """HTML-unescape, strip tags, unwrap Python-list reprs (MiniOneRec ``"['...']"``), squeeze spaces."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(clean_text(v) for v in value if v)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]") and ("'" in text or '"' in text):
        try:
            parsed = ast.literal_eval(text)  # literal_eval only parses literals, never runs code
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list):
            return clean_text(parsed)
    for _ in range(2):  # some Amazon fields are escaped twice (&amp;amp;)
        text = html.unescape(text)
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def split_categories(value: object) -> list[str]:
    """Categories arrive as a list, a list of lists (Amazon 2014) or a comma-joined string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        parts = value.split(",")
    else:
        parts = []
        for v in value:
            parts.extend(v if isinstance(v, list | tuple) else [v])
    out: list[str] = []
    for p in parts:
        p = clean_text(p)
        if p and p not in out:
            out.append(p)
    return out


def truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,.;") + "..."


def render_item_text(
    item: Item, template: str = DEFAULT_TEMPLATE, max_description_chars: int = 300, max_chars: int = 1000
) -> str:
    """Fill the template; empty fields and their dangling labels are dropped."""
    fields = {
        "title": item.title.rstrip(" ."),
        "brand": item.brand.rstrip(" ."),
        "categories": ", ".join(item.categories),
        "description": truncate(item.description, max_description_chars),
        **{k: clean_text(v) for k, v in item.extra.items()},
    }
    try:
        text = template.format(**fields)
    except KeyError as e:
        raise ValueError(f"item text template names unknown field {e}; available: {sorted(fields)}") from e
    # Drop labels whose value was empty ("Brand: ." -> "").
    text = re.sub(r"\b[A-Z][a-z]+: \.\s*", "", text)
    text = _SPACE.sub(" ", text).strip(" .")
    return truncate(text, max_chars)
