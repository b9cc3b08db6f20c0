"""The ``index.json`` file format of Semantic IDs (LC-Rec / MiniOneRec): item id -> SID tokens.

Level ``l`` code ``c`` is the token ``<{prefix_l}_{c}>`` with prefixes ``a, b, c, ...``. This
module only reads and writes the file (so the data stage can validate and keep third-party
SIDs without depending on ``sid_tokenizer``); ``sid_tokenizer.sid.SidIndex`` is the object
the rest of sidrec works with.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from data_prep.io import DataError, atomic_write_json, read_json

LEVEL_PREFIXES = string.ascii_lowercase
_TOKEN = re.compile(r"<([a-z])_(\d+)>")
# Every code of every level is one new LLM token (and a row of the constrained-decoding tables).
# 3 levels x 65,536 codes are 196,608 tokens, more than Qwen2's whole vocabulary (151,646), and
# far above what LC-Rec / MiniOneRec / TIGER use (256 per level). A larger code in a third-party
# index is corruption, not a design: <a_99999999999> made a 10^11-entry vocabulary (> 300 s, 6.6 GB
# before it was capped).
MAX_CODEBOOK_SIZE = 65536
MAX_LEVELS = len(LEVEL_PREFIXES)  # levels are named a..z


def check_level_sizes(level_sizes: tuple[int, ...] | list[int]) -> str | None:
    """Why ``level_sizes`` is not a usable SID layout, or None."""
    if not level_sizes:
        return "no levels"
    if len(level_sizes) > MAX_LEVELS:
        return f"{len(level_sizes)} levels, at most {MAX_LEVELS} (named a..z)"
    for lv, n in enumerate(level_sizes):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= int(n) <= MAX_CODEBOOK_SIZE:
            return (
                f"codebook size {n!r} at level {LEVEL_PREFIXES[lv]!r}: expected an integer in "
                f"1..{MAX_CODEBOOK_SIZE} (each code is one LLM token)"
            )
    return None


def sid_token(level: int, code: int) -> str:
    return f"<{LEVEL_PREFIXES[level]}_{int(code)}>"


def read_sid_index_json(
    path: str | Path, raw_ids: list[str] | None = None, level_sizes: tuple[int, ...] | None = None
) -> tuple[list[str], np.ndarray, tuple[int, ...]]:
    """Read an ``index.json`` -> (item keys in order, codes (N, L) int64, level sizes).

    With ``raw_ids`` (the catalogue's item ids in dense order) every catalogue item must have an
    entry, and the keys are ``raw_ids``. Codebook sizes are inferred (max code + 1, rounded up
    to a power of two) unless ``level_sizes`` is given. DataError names the file and the key.
    """
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, "expected a non-empty object of item id -> list of SID tokens")
    keys = raw_ids if raw_ids is not None else sorted(raw, key=lambda k: (len(k), k))
    parsed: list[list[int]] = []
    num_levels = None
    for key in keys:
        if key not in raw:
            raise DataError(path, "catalogue item has no SID in the index", key=key)
        toks = raw[key]
        if isinstance(toks, str):  # "<a_1><b_2>" instead of a list: split, rejecting other text
            found = [m.group(0) for m in _TOKEN.finditer(toks)]
            toks = found if "".join(found) == toks.strip() else None
        if not isinstance(toks, list) or not toks:
            raise DataError(path, f"expected a list of SID tokens, got {raw[key]!r}", key=key)
        if len(toks) > MAX_LEVELS:
            raise DataError(path, f"SID has {len(toks)} tokens, at most {MAX_LEVELS} levels (a..z)", key=key)
        row = []
        for lv, t in enumerate(toks):
            m = _TOKEN.fullmatch(t) if isinstance(t, str) else None
            if m is None or m.group(1) != LEVEL_PREFIXES[lv]:
                raise DataError(path, f"token {lv + 1} is {t!r}, expected <{LEVEL_PREFIXES[lv]}_N>", key=key)
            digits = m.group(2)
            if len(digits) > 6 or int(digits) >= MAX_CODEBOOK_SIZE:  # length first: no huge ints
                raise DataError(
                    path,
                    f"token {t[:20]!r}: code {digits[:12]}{'...' if len(digits) > 12 else ''} is not below the "
                    f"codebook cap {MAX_CODEBOOK_SIZE} (each code is one LLM token)",
                    key=key,
                )
            row.append(int(digits))
        if num_levels is None:
            num_levels = len(row)
        elif len(row) != num_levels:
            raise DataError(path, f"SID has {len(row)} levels, others have {num_levels}", key=key)
        parsed.append(row)
    codes = np.asarray(parsed, dtype=np.int64)
    if level_sizes is None:
        level_sizes = tuple(int(2 ** int(np.ceil(np.log2(max(int(m) + 1, 2))))) for m in codes.max(0))
    elif len(level_sizes) != codes.shape[1]:
        raise DataError(path, f"SIDs have {codes.shape[1]} levels, level_sizes gives {len(level_sizes)}")
    elif (problem := check_level_sizes(tuple(level_sizes))) is not None:
        raise DataError(path, f"level_sizes: {problem}", field="level_sizes")
    else:
        over = codes >= np.asarray(level_sizes)
        if over.any():
            row, lv = (int(v[0]) for v in np.nonzero(over))
            raise DataError(
                path,
                f"code {codes[row, lv]} at level {LEVEL_PREFIXES[lv]!r} exceeds codebook "
                f"size {level_sizes[lv]}",
                key=keys[row],
            )
    return list(keys), codes, tuple(int(n) for n in level_sizes)


def write_sid_index_json(path: str | Path, raw_ids: list[str], codes: np.ndarray) -> None:
    """Write ``index.json`` (atomically): raw id -> list of SID tokens."""
    atomic_write_json(
        path,
        {
            r: [sid_token(lv, c) for lv, c in enumerate(row)]
            for r, row in zip(raw_ids, np.asarray(codes).tolist(), strict=True)
        },
        indent=None,
    )
