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
        row = []
        for lv, t in enumerate(toks):
            m = _TOKEN.fullmatch(str(t))
            if m is None or m.group(1) != LEVEL_PREFIXES[lv]:
                raise DataError(path, f"token {lv + 1} is {t!r}, expected <{LEVEL_PREFIXES[lv]}_N>", key=key)
            row.append(int(m.group(2)))
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
