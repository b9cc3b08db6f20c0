"""The SID vocabulary: token strings per level, parsing/formatting, and the item <-> SID index.

A SID is a fixed-length tuple of codes, one per level; level ``l`` code ``c`` is the token
``<{prefix_l}_{c}>`` with prefixes ``a, b, c, d, ...`` (LC-Rec / MiniOneRec convention), e.g.
``<a_12><b_5><c_77>``. ``index.json`` maps item id -> list of tokens, as LC-Rec and
MiniOneRec write it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.sid_json import (
    _TOKEN,
    LEVEL_PREFIXES,
    check_level_sizes,
    read_sid_index_json,
    write_sid_index_json,
)


class SidFormatError(ValueError):
    """A SID string or token that does not match the vocabulary."""


@dataclass(frozen=True)
class SidVocab:
    """Codebook sizes per level, e.g. (256, 256, 256) -> tokens <a_0>..<c_255>."""

    level_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        problem = check_level_sizes(self.level_sizes)
        if problem is not None:  # e.g. sizes from a hand-edited meta.json
            raise SidFormatError(f"SID layout {tuple(self.level_sizes)}: {problem}")

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def token(self, level: int, code: int) -> str:
        if not 0 <= level < self.num_levels:
            raise SidFormatError(f"level {level} out of range (SIDs have {self.num_levels} levels)")
        if not 0 <= code < self.level_sizes[level]:
            raise SidFormatError(
                f"code {code} out of range for level {LEVEL_PREFIXES[level]!r} "
                f"(size {self.level_sizes[level]})"
            )
        return f"<{LEVEL_PREFIXES[level]}_{code}>"

    def tokens(self) -> list[str]:
        """All SID tokens, level by level (the strings to add to an LLM vocabulary)."""
        return [f"<{LEVEL_PREFIXES[lv]}_{c}>" for lv, n in enumerate(self.level_sizes) for c in range(n)]

    def format(self, codes) -> str:
        codes = list(codes)
        if len(codes) != self.num_levels:
            raise SidFormatError(f"SID has {len(codes)} codes, expected {self.num_levels}")
        return "".join(self.token(lv, int(c)) for lv, c in enumerate(codes))

    def parse(self, sid: str | list[str]) -> tuple[int, ...]:
        """``"<a_1><b_2><c_3>"`` or ``["<a_1>", "<b_2>", "<c_3>"]`` -> (1, 2, 3), validated."""
        text = "".join(sid) if isinstance(sid, list | tuple) else str(sid)
        text = text.strip()
        matches = list(_TOKEN.finditer(text))
        if not matches or "".join(m.group(0) for m in matches) != text:
            raise SidFormatError(f"{text!r} is not a SID: expected tokens like <a_12><b_5><c_77>")
        if len(matches) != self.num_levels:
            raise SidFormatError(f"{text!r} has {len(matches)} tokens, expected {self.num_levels}")
        codes = []
        for lv, m in enumerate(matches):
            if m.group(1) != LEVEL_PREFIXES[lv]:
                raise SidFormatError(
                    f"{text!r}: token {lv + 1} is {m.group(0)}, expected level {LEVEL_PREFIXES[lv]!r}"
                )
            digits = m.group(2)  # length first: int() of thousands of digits is slow or refused
            if len(digits) > 6 or int(digits) >= self.level_sizes[lv]:
                raise SidFormatError(
                    f"{text[:80]!r}: {m.group(0)[:20]} exceeds codebook size {self.level_sizes[lv]}"
                )
            code = int(digits)
            codes.append(code)
        return tuple(codes)

    def find_all(self, text: str) -> list[tuple[int, ...]]:
        """Every well-formed full SID inside free text (e.g. a chat prompt), in order."""
        pattern = "".join(rf"<{LEVEL_PREFIXES[lv]}_(\d{{1,6}})>" for lv in range(self.num_levels))
        out = []
        for m in re.finditer(pattern, text):
            codes = tuple(int(g) for g in m.groups())
            if all(c < n for c, n in zip(codes, self.level_sizes, strict=True)):
                out.append(codes)
        return out


class SidIndex:
    """Item id (dense int) <-> SID codes, with the item raw ids used in ``index.json``."""

    def __init__(self, codes: np.ndarray, vocab: SidVocab, raw_ids: list[str] | None = None) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != vocab.num_levels:
            raise ValueError(f"codes must have shape (items, {vocab.num_levels}), got {codes.shape}")
        self.codes = codes
        self.vocab = vocab
        self.raw_ids = raw_ids if raw_ids is not None else [str(i) for i in range(len(codes))]
        self._sid_to_items: dict[tuple[int, ...], list[int]] | None = None

    def __len__(self) -> int:
        return len(self.codes)

    def sid(self, item_id: int) -> str:
        return self.vocab.format(self.codes[item_id])

    def sid_tokens(self, item_id: int) -> list[str]:
        return [self.vocab.token(lv, int(c)) for lv, c in enumerate(self.codes[item_id])]

    @property
    def sid_to_items(self) -> dict[tuple[int, ...], list[int]]:
        if self._sid_to_items is None:
            m: dict[tuple[int, ...], list[int]] = {}
            for i, row in enumerate(map(tuple, self.codes.tolist())):
                m.setdefault(row, []).append(i)
            self._sid_to_items = m
        return self._sid_to_items

    def items_for(self, sid: str | tuple[int, ...]) -> list[int]:
        codes = self.vocab.parse(sid) if isinstance(sid, str) else tuple(sid)
        return self.sid_to_items.get(codes, [])

    def num_collisions(self) -> int:
        """Items that share their SID with an earlier item."""
        return len(self.codes) - len(self.sid_to_items)

    def save(self, path: str | Path) -> None:
        write_sid_index_json(path, self.raw_ids, self.codes)

    @classmethod
    def load(
        cls, path: str | Path, raw_ids: list[str] | None = None, level_sizes: tuple[int, ...] | None = None
    ) -> SidIndex:
        """Read an LC-Rec/MiniOneRec ``index.json`` (item id -> list of SID tokens).

        With ``raw_ids`` (the catalogue's item ids in dense order) every catalogue item must
        have an entry. Codebook sizes are inferred (max code + 1, rounded up to a power of
        two) unless ``level_sizes`` is given.
        """
        keys, codes, level_sizes = read_sid_index_json(path, raw_ids, level_sizes)
        return cls(codes, SidVocab(tuple(level_sizes)), raw_ids=list(keys))


class SidTokenCodes:
    """Token id -> SID code lookup, one table per level (-1 for tokens that are not that level's).

    ``level_token_ids[l][c]`` is the token id of code ``c`` at level ``l``
    (``sid_tokenizer.vocab.sid_token_ids``). Shared by the HF logits processor, the beam-search
    ranker and the vLLM backends so that all of them read generated tokens the same way.
    """

    def __init__(self, level_token_ids: list[np.ndarray], vocab_size: int | None = None) -> None:
        self.level_token_ids = [np.asarray(t, dtype=np.int64) for t in level_token_ids]
        n = max(vocab_size or 0, max(int(t.max()) for t in self.level_token_ids) + 1)
        self.tables: list[np.ndarray] = []
        for ids in self.level_token_ids:
            table = np.full(n, -1, dtype=np.int64)
            table[ids] = np.arange(len(ids))
            self.tables.append(table)

    @property
    def num_levels(self) -> int:
        return len(self.tables)

    def level(self, tokens: np.ndarray, level: int) -> np.ndarray:
        """Codes of ``tokens`` (any shape) read as level ``level``; -1 where not a SID token of it."""
        table = self.tables[level]
        tokens = np.asarray(tokens, dtype=np.int64)
        ok = (tokens >= 0) & (tokens < len(table))
        return np.where(ok, table[np.clip(tokens, 0, len(table) - 1)], -1)

    def codes(self, tokens: np.ndarray) -> np.ndarray:
        """(N, d) token ids, column j read at level ``j % num_levels`` -> (N, d) codes (-1 if not)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(len(tokens), -1)
        out = np.full(tokens.shape, -1, dtype=np.int64)
        for j in range(tokens.shape[1]):
            out[:, j] = self.level(tokens[:, j], j % self.num_levels)
        return out
