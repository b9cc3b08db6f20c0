"""SID-trie constrained decoding inside vLLM (V1 logits-processor interface), plus a prompt guard.

Load it into a server or an offline engine::

    python -m vllm.entrypoints.openai.api_server --model CKPT \\
        --logits-processors sid_tokenizer.vllm_processor:SidTrieLogitsProcessor \\
        --middleware sid_tokenizer.vllm_processor.sid_prompt_guard
    LLM(model=CKPT, logits_processors=[SidTrieLogitsProcessor])

The catalogue is ``<model>/sidrec/`` (``SIDREC_CHECKPOINT`` overrides the directory). The
processor does nothing unless a request switches it on through ``vllm_xargs`` (OpenAI body)
or ``SamplingParams.extra_args`` (offline):

- ``sid_constrained: 1``: the completion is exactly ``sid_count`` catalogue SIDs, then EOS.
- ``sid_items: "id1,id2"`` (or a list): only these items (raw item ids of ``items.jsonl``).
- ``sid_category: "Staples"``: only items having this category (any level, case-insensitive).
- ``sid_count: k``: k distinct SIDs back to back (default 1).
- ``sid_prefix_len: d``: the prompt's last ``d`` tokens already start the SID (step-wise beam
  search sends the beam's prefix inside the prompt).
- ``sid_logprobs: 1``: rows carry ``log_softmax`` of the unconstrained model (masked tokens
  -inf). Sampling is unchanged (softmax is shift-invariant), but an engine started with
  ``logprobs_mode="processed_logits"`` then reports the model's own log-probabilities of the
  allowed tokens: the scores of a constrained beam search.

State: per batch row the parsed arguments, the prompt tail and vLLM's live list of output
tokens (a reference, so it grows by itself). The trie position is recomputed from those
tokens at every step, never accumulated, so preemption, batch moves and swaps cannot
desynchronise it. Masking is a scatter of CSR index arrays from ``SidTrie.allowed_pairs``.

``validate_params`` runs in the API-server process, which has no engine config: it finds the
catalogue through ``SIDREC_CHECKPOINT`` or the ``--model`` argument of the server command line
(``recipes/serve.py`` sets the variable). Bad arguments raise ``ValueError`` -> HTTP 400.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from sid_tokenizer.catalog import LiveCatalogue
from sid_tokenizer.sid import SidTokenCodes
from sid_tokenizer.trie import SidTrie

logger = logging.getLogger(__name__)

ENV_CHECKPOINT = "SIDREC_CHECKPOINT"
# Seconds between checks of the catalogue files' modification times (0: check on every new request).
ENV_RELOAD_SECONDS = "SIDREC_RELOAD_SECONDS"
SID_ARGS = (
    "sid_constrained",
    "sid_items",
    "sid_category",
    "sid_count",
    "sid_prefix_len",
    "sid_logprobs",
    "sid_exclude",
    "sid_exclude_seen",
    "sid_rank",
)
MAX_SID_COUNT = 100
_SUBTRIE_CACHE_SIZE = 256


# ----------------------------------------------------------------------------- request arguments
@dataclass(frozen=True)
class SidRequest:
    """Parsed per-request arguments (see the module docstring)."""

    constrained: bool = False
    items: tuple[str, ...] | None = None
    category: str | None = None
    count: int = 1
    prefix_len: int = 0
    logprobs: bool = False
    exclude: tuple[str, ...] | None = None  # raw item ids never to produce (blocklist)
    exclude_seen: bool = False  # never produce a SID the prompt already mentions
    rank: bool = False  # answer with the constrained beam-search top-sid_count (sid_prompt_guard)

    @property
    def filter_key(self) -> tuple:
        """Requests with the same key share one (sub-)trie."""
        return (self.items, self.category.lower() if self.category else None)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise ValueError(f"vllm_xargs.{name} must be 0/1 or true/false, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"vllm_xargs.{name} must be an integer in [{lo}, {hi}], got {value!r}")
    try:
        out = int(value)
    except (ValueError, OverflowError):  # OverflowError: JSON Infinity
        raise ValueError(f"vllm_xargs.{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if out != float(value) or not lo <= out <= hi:
        raise ValueError(f"vllm_xargs.{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return out


def _id_list(name: str, value: Any, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    if not isinstance(value, list | tuple) or not all(
        isinstance(s, str | int) and not isinstance(s, bool) for s in value
    ):
        raise ValueError(
            f"vllm_xargs.{name} must be a comma-separated string or a list of item ids, got {value!r}"
        )
    out = tuple(sorted({str(s).strip() for s in value if str(s).strip()}))
    if not out and not allow_empty:
        raise ValueError(f"vllm_xargs.{name} is empty")
    return out


def parse_sid_args(extra_args: dict[str, Any] | None) -> SidRequest | None:
    """``SamplingParams.extra_args`` -> ``SidRequest``; None when the processor is not asked for.

    Raises ValueError naming the argument for wrong types, unknown ``sid*`` names (in any
    letter case: ``SID_COUNT`` is not silently ignored) and filters given without
    ``sid_constrained``. Checks against the catalogue are ``ServingCatalogue.check``.
    """
    if not extra_args:
        return None
    unknown = sorted(k for k in extra_args if k.lower().startswith("sid") and k not in SID_ARGS)
    if unknown:
        hint = [k.lower() for k in unknown if k.lower() in SID_ARGS]
        raise ValueError(
            f"unknown vllm_xargs {unknown}"
            + (f" (names are lower case: {hint})" if hint else "")
            + f"; expected some of {list(SID_ARGS)}"
        )
    if not any(k in extra_args for k in SID_ARGS):
        return None
    constrained = _flag("sid_constrained", extra_args.get("sid_constrained", 0))
    logprobs = _flag("sid_logprobs", extra_args.get("sid_logprobs", 0))
    items = extra_args.get("sid_items")
    if items is not None:
        items = _id_list("sid_items", items)
    exclude = extra_args.get("sid_exclude")
    if exclude is not None:
        exclude = _id_list("sid_exclude", exclude, allow_empty=True) or None
    exclude_seen = _flag("sid_exclude_seen", extra_args.get("sid_exclude_seen", 0))
    rank = _flag("sid_rank", extra_args.get("sid_rank", 0))
    category = extra_args.get("sid_category")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise ValueError(f"vllm_xargs.sid_category must be a non-empty string, got {category!r}")
    count = _int("sid_count", extra_args.get("sid_count", 1), 1, MAX_SID_COUNT)
    prefix_len = _int("sid_prefix_len", extra_args.get("sid_prefix_len", 0), 0, 64)
    if not constrained and (
        items is not None
        or category is not None
        or "sid_count" in extra_args
        or prefix_len
        or exclude is not None
        or exclude_seen
        or rank
    ):
        raise ValueError(
            "vllm_xargs sid_items / sid_category / sid_count / sid_prefix_len / sid_exclude / "
            "sid_exclude_seen / sid_rank need sid_constrained=1"
        )
    if rank and prefix_len:
        raise ValueError("vllm_xargs.sid_rank ranks whole SIDs: sid_prefix_len must be 0")
    if not constrained and not logprobs:
        return None
    return SidRequest(
        constrained,
        items,
        category.strip() if category else None,
        count,
        prefix_len,
        logprobs,
        exclude,
        exclude_seen,
        rank,
    )


# ----------------------------------------------------------------------------- catalogue + tries
@dataclass
class _TrieInfo:
    """A trie plus, lazily, what distinct multi-SID completions need: parent ids and leaf counts."""

    trie: SidTrie
    parents: list[np.ndarray] = field(default_factory=list)  # [d]: node at depth d+1 -> its parent
    leaf_counts: list[np.ndarray] = field(default_factory=list)  # [d]: leaves below each node at depth d

    def ensure_counts(self) -> None:
        if self.leaf_counts:
            return
        t = self.trie
        self.parents = [t.edge_keys[d] // t.level_sizes[d] for d in range(t.num_levels)]
        counts = [np.ones(t.num_leaves, dtype=np.int64)]
        for d in range(t.num_levels - 1, -1, -1):
            n = len(t.offsets[d]) - 1
            counts.append(np.bincount(self.parents[d], weights=counts[-1], minlength=n).astype(np.int64))
        self.leaf_counts = counts[::-1]


class ServingCatalogue:
    """``<checkpoint>/sidrec`` for serving: SID index, raw ids, categories, the full trie and
    per-filter sub-tries (LRU cache), reloaded when ``index.json``/``items.jsonl`` change."""

    def __init__(self, checkpoint: str | Path, reload_seconds: float | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.dir = self.checkpoint / "sidrec"
        if not (self.dir / "meta.json").exists():
            raise FileNotFoundError(
                f"{self.dir / 'meta.json'} not found: {self.checkpoint} is not a sidrec "
                f"checkpoint (set {ENV_CHECKPOINT} to the checkpoint that holds sidrec/)"
            )
        if reload_seconds is None:
            reload_seconds = float(os.environ.get(ENV_RELOAD_SECONDS, "2"))
        self.reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self.live = LiveCatalogue(self.checkpoint, reload_seconds, build=self._build)
        self.__dict__.update(self.live.value)

    def _build(self, cat) -> dict[str, Any]:
        """Everything serving derives from a ``Catalogue`` (applied in one step by ``refresh``)."""
        by_cat: dict[str, list[int]] = {}
        for i, cats in enumerate(cat.categories):
            for c in {str(c).strip().lower() for c in cats}:
                by_cat.setdefault(c, []).append(i)
        # deactivated items (sid_tokenizer.new_items.remove_items) keep their ids but are never served
        active = np.asarray(cat.active or [True] * len(cat.raw_ids), dtype=bool)
        active_items = np.flatnonzero(active)
        if not len(active_items):
            raise ValueError(f"{self.dir / 'items.jsonl'}: every item is deactivated; nothing to serve")
        full = _TrieInfo(SidTrie(cat.index.codes[active_items], cat.index.vocab.level_sizes))
        logger.info(
            "sidrec catalogue %s: %d items (%d active), %d distinct SIDs",
            self.dir,
            len(cat.index),
            len(active_items),
            len(full.trie),
        )
        return {
            "index": cat.index,
            "titles": cat.titles,
            "raw_ids": cat.raw_ids,
            "item_of_raw": {r: i for i, r in enumerate(cat.raw_ids)},
            "items_of_category": {c: np.asarray(v, dtype=np.int64) for c, v in by_cat.items()},
            "active": active,
            "active_items": active_items,
            "full": full,
            "_subtries": OrderedDict(),
        }

    @property
    def num_levels(self) -> int:
        return self.index.vocab.num_levels

    @property
    def reload_error(self) -> str | None:
        """Why the last reload failed (the previous catalogue is still served), None if it did not."""
        return self.live.error

    def refresh(self, force: bool = False) -> bool:
        """Reload if the catalogue files changed (checked at most every ``reload_seconds``); a
        broken edit keeps the previous catalogue (``sid_tokenizer.catalog.LiveCatalogue``)."""
        if not self.live.refresh(force):
            return False
        with self._lock:
            self.__dict__.update(self.live.value)
        return True

    def select_items(self, req: SidRequest, strict: bool = True) -> np.ndarray | None:
        """Item ids allowed by the request's filter (None: no filter). ``strict`` raises
        ValueError for unknown ids and empty results; otherwise they are dropped / returned empty."""
        sel = None
        if req.items is not None:
            known = [self.item_of_raw[r] for r in req.items if r in self.item_of_raw]
            missing = [r for r in req.items if r not in self.item_of_raw]
            # an allow-list may name items deactivated since the client built it: they are dropped
            known = [i for i in known if self.active[i]]
            if missing and strict:
                shown = ", ".join(repr(m) for m in missing[:5])
                raise ValueError(
                    f"vllm_xargs.sid_items: {len(missing)} unknown item id(s) ({shown}"
                    f"{', ...' if len(missing) > 5 else ''}); ids are the raw_id column of "
                    f"{self.dir / 'items.jsonl'}"
                )
            sel = np.asarray(sorted(known), dtype=np.int64)
        if req.category is not None:
            in_cat = self.items_of_category.get(req.category.lower(), np.zeros(0, dtype=np.int64))
            in_cat = in_cat[self.active[in_cat]]
            sel = in_cat if sel is None else np.intersect1d(sel, in_cat)
            if len(sel) == 0 and strict:
                raise ValueError(
                    f"vllm_xargs.sid_category {req.category!r}: no catalogue item matches"
                    f"{' among sid_items' if req.items is not None else ''}"
                )
        if sel is not None and len(sel) == 0 and strict:
            raise ValueError("vllm_xargs.sid_items: no active catalogue item selected")
        return sel

    def allowed_items(self, req: SidRequest) -> np.ndarray:
        """Active item ids the request's filter allows, before its exclusions."""
        sel = self.select_items(req, strict=False)
        return self.active_items if sel is None else sel

    def banned_codes(self, req: SidRequest, seen: np.ndarray | None = None) -> np.ndarray | None:
        """(n, L) SIDs the request must never produce, None if none: the SIDs the prompt
        mentions (``seen``, with ``sid_exclude_seen``) and those whose every allowed item is on
        the ``sid_exclude`` blocklist (a SID shared with an item not on it stays allowed).
        Blocklisted ids that are not catalogue items are ignored."""
        L = self.num_levels
        parts = []
        if req.exclude_seen and seen is not None and len(seen):
            parts.append(np.asarray(seen, dtype=np.int64).reshape(-1, L))
        if req.exclude:
            ex = {self.item_of_raw[r] for r in req.exclude if r in self.item_of_raw}
            if ex:
                allowed = self.allowed_items(req)
                codes = self.index.codes[allowed]
                blocked = np.isin(allowed, np.fromiter(ex, dtype=np.int64))
                sids, inv = np.unique(codes, axis=0, return_inverse=True)
                inv = inv.reshape(-1)
                keep = np.bincount(inv, weights=~blocked, minlength=len(sids)) == 0
                parts.append(sids[keep])
        if not parts:
            return None
        out = np.unique(np.concatenate(parts), axis=0)
        return out if len(out) else None

    def items_of_sid(self, codes: tuple[int, ...], req: SidRequest | None = None) -> list[int]:
        """Active items behind a SID, inside the request's filter and not on its blocklist."""
        items = [i for i in self.index.sid_to_items.get(tuple(codes), []) if self.active[i]]
        if req is None:
            return items
        sel = self.select_items(req, strict=False)
        if sel is not None:
            items = [i for i in items if i in set(sel.tolist())]
        if req.exclude:
            ex = set(req.exclude)
            items = [i for i in items if self.raw_ids[i] not in ex]
        return items

    def trie_for(self, req: SidRequest, strict: bool = False) -> _TrieInfo | None:
        """The full trie, or the cached sub-trie of the request's filter (None if it is empty)."""
        key = req.filter_key
        if key == (None, None):
            return self.full
        with self._lock:
            hit = self._subtries.get(key)
            if hit is not None:
                self._subtries.move_to_end(key)
                return hit
        sel = self.select_items(req, strict=strict)
        info = _TrieInfo(SidTrie(self.index.codes[sel], self.index.vocab.level_sizes)) if len(sel) else None
        if info is not None:
            with self._lock:
                self._subtries[key] = info
                while len(self._subtries) > _SUBTRIE_CACHE_SIZE:
                    self._subtries.popitem(last=False)
        return info

    def check(self, req: SidRequest, banned: np.ndarray | None = None) -> None:
        """ValueError when the request cannot be served by this catalogue (``banned``: the
        request's excluded SIDs, ``banned_codes``)."""
        info = self.trie_for(req, strict=True)
        left = len(info.trie)
        if banned is not None and len(banned):
            left -= int((info.trie.walk(banned) >= 0).sum())
        if req.count > left:
            raise ValueError(
                f"vllm_xargs.sid_count={req.count} but the filter"
                f"{' and exclusions leave' if banned is not None else ' leaves'} only {left} "
                f"distinct SID(s)"
            )
        if req.prefix_len >= self.num_levels:
            raise ValueError(f"vllm_xargs.sid_prefix_len must be < {self.num_levels} (SID length)")


# ----------------------------------------------------------------------------- masks
class SidMasker:
    """Allowed next tokens for rows of (request, generated SID tokens); no vLLM objects inside."""

    def __init__(
        self, catalogue: ServingCatalogue, level_token_ids: list[np.ndarray], vocab_size: int | None = None
    ) -> None:
        """level_token_ids[l][c]: token id of code c at level l (``sid_tokenizer.vocab.sid_token_ids``)."""
        self.catalogue = catalogue
        self.token_codes = SidTokenCodes(level_token_ids, vocab_size)
        self.level_token_ids = self.token_codes.level_token_ids

    @property
    def num_levels(self) -> int:
        return self.token_codes.num_levels

    def codes_of(self, tokens: np.ndarray) -> np.ndarray:
        """(N, d) token ids at levels 0..d-1 -> codes (-1 where a token is not that level's SID token)."""
        return self.token_codes.codes(tokens)

    def sids_in_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """(n, L) codes of the complete SIDs in a token sequence: runs of level-0..L-1 SID
        tokens in order (a partial SID, e.g. a beam prefix at the end, is not counted)."""
        L = self.num_levels
        toks = np.asarray(tokens, dtype=np.int64)
        if len(toks) < L:
            return np.zeros((0, L), dtype=np.int64)
        codes = np.stack([self.token_codes.level(toks, lv) for lv in range(L)], axis=1)  # (T, L)
        found, t = [], 0
        while t + L <= len(toks):
            row = [codes[t + j, j] for j in range(L)]
            if min(row) >= 0:
                found.append(row)
                t += L
            else:
                t += 1
        return np.asarray(found, dtype=np.int64).reshape(-1, L)

    def allowed(
        self,
        reqs: Sequence[SidRequest],
        generated: Sequence[Sequence[int]],
        banned: Sequence[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each row (a constrained request and its SID tokens so far, prompt prefix included):
        (rows, token_ids) of allowed SID tokens, flattened, and the rows that may only end.

        ``banned[r]``: (n, L) SID codes row r must not produce (its exclusions); SIDs the row
        already produced (``sid_count`` > 1) are never produced twice. A child whose every leaf
        is banned or produced is not allowed; a row left with nothing may only end."""
        L = self.num_levels
        groups: dict[tuple, list[int]] = {}
        end_rows: list[int] = []
        for r, (req, gen) in enumerate(zip(reqs, generated, strict=True)):
            if len(gen) >= req.count * L:
                end_rows.append(r)
            else:
                groups.setdefault((req.filter_key, len(gen) % L), []).append(r)
        out_rows, out_toks = [], []
        for (_, d), rows in groups.items():
            info = self.catalogue.trie_for(reqs[rows[0]])
            if info is None:  # an empty filter that the API server could not check: end at once
                end_rows.extend(rows)
                continue
            trie = info.trie
            rows_a = np.asarray(rows, dtype=np.int64)
            if d:
                prefix = np.asarray([gen[len(gen) - d :] for gen in (generated[r] for r in rows)])
                nodes = trie.walk(self.codes_of(prefix))
            else:
                nodes = np.zeros(len(rows), dtype=np.int64)
            end_rows.extend(rows_a[nodes < 0].tolist())
            rr, codes = trie.allowed_pairs(d, nodes)
            group_banned = [banned[r] for r in rows] if banned is not None else None
            keep = self._distinct(info, d, rows_a, nodes, rr, codes, generated, group_banned)
            if keep is not None:
                rr, codes = rr[keep], codes[keep]
                empty = np.setdiff1d(np.flatnonzero(nodes >= 0), rr)  # every child used up
                end_rows.extend(rows_a[empty].tolist())
            out_rows.append(rows_a[rr])
            out_toks.append(self.level_token_ids[d][codes])
        rows_out = np.concatenate(out_rows) if out_rows else np.zeros(0, dtype=np.int64)
        toks_out = np.concatenate(out_toks) if out_toks else np.zeros(0, dtype=np.int64)
        return rows_out, toks_out, np.asarray(sorted(end_rows), dtype=np.int64)

    def _distinct(
        self,
        info: _TrieInfo,
        d: int,
        rows: np.ndarray,
        nodes: np.ndarray,
        rr: np.ndarray,
        codes: np.ndarray,
        generated: Sequence[Sequence[int]],
        banned: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray | None:
        """Bool mask over the flattened (rr, codes) pairs dropping children whose every leaf is a
        SID this row already produced (``sid_count`` > 1) or must not produce (``banned``);
        None when no row has any."""
        L = self.num_levels
        used_of: dict[int, np.ndarray] = {}
        trie = info.trie
        for k, r in enumerate(rows.tolist()):
            parts = []
            gen = generated[r]
            done = len(gen) // L
            if done:
                parts.append(self.codes_of(np.asarray(gen[: done * L]).reshape(done, L)))
            if banned is not None and banned[k] is not None and len(banned[k]):
                parts.append(np.asarray(banned[k], dtype=np.int64).reshape(-1, L))
            if parts:
                leaves = trie.walk(np.concatenate(parts))
                leaves = np.unique(leaves[leaves >= 0])  # a banned SID produced anyway counts once
                if len(leaves):
                    used_of[k] = leaves
        if not used_of:
            return None
        info.ensure_counts()
        child = trie.step(d, nodes[rr], codes)  # node ids at depth d+1
        keep = np.ones(len(rr), dtype=bool)
        for k, used in used_of.items():
            anc = used
            for lv in range(L - 1, d, -1):  # leaves (depth L) up to depth d+1
                anc = info.parents[lv][anc]
            uniq, cnt = np.unique(anc, return_counts=True)
            exhausted = uniq[cnt >= info.leaf_counts[d + 1][uniq]]
            if len(exhausted):
                sel = rr == k
                keep[sel] = ~np.isin(child[sel], exhausted)
        return keep


# ----------------------------------------------------------------------------- API-server side
_frontend: dict[str, ServingCatalogue | None] = {}


def _checkpoint_from_argv(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    if len(argv) > 2 and argv[1] == "serve" and not argv[2].startswith("-"):  # `vllm serve MODEL`
        return argv[2]
    return None


def _frontend_path() -> str | None:
    return os.environ.get(ENV_CHECKPOINT) or _checkpoint_from_argv(sys.argv)


def frontend_catalogue() -> ServingCatalogue | None:
    """The catalogue as seen by the API-server process (None if it cannot be located)."""
    path = _frontend_path()
    if not path:
        return None
    cat = _frontend.get(path)
    if cat is not None:
        cat.refresh()  # a clock check; the files are stat-ed every reload_seconds
        return cat
    if not (Path(path) / "sidrec" / "meta.json").exists():
        return None
    cat = _frontend[path] = ServingCatalogue(path)
    return cat


_frontend_maskers: dict[str, SidMasker] = {}


def frontend_masker() -> SidMasker | None:
    """A ``SidMasker`` on the frontend catalogue plus the checkpoint's tokenizer (``.tokenizer``),
    for the checks that read token ids and for the ranking route (None without a catalogue)."""
    cat = frontend_catalogue()
    if cat is None:
        return None
    path = _frontend_path()
    masker = _frontend_maskers.get(path)
    if masker is None:
        from transformers import AutoTokenizer

        from sid_tokenizer.vocab import sid_token_ids

        tokenizer = AutoTokenizer.from_pretrained(path)
        masker = SidMasker(cat, sid_token_ids(tokenizer, cat.index.vocab), vocab_size=len(tokenizer))
        masker.tokenizer = tokenizer
        _frontend_maskers[path] = masker
    return masker


def request_banned_codes(
    catalogue: ServingCatalogue, masker: SidMasker, req: SidRequest, prompt_ids: Sequence[int] | None
) -> np.ndarray | None:
    """(n, L) SIDs a request must not produce (``sid_exclude``, and with ``sid_exclude_seen`` the
    complete SIDs in its prompt, minus a ``sid_prefix_len`` tail); None if none. Shared by the
    V1 processor and any other engine integration that masks with ``SidMasker.allowed``."""
    if not req.constrained or not (req.exclude or req.exclude_seen):
        return None
    context = list(prompt_ids or [])
    if req.prefix_len:
        context = context[: len(context) - req.prefix_len]
    seen = masker.sids_in_tokens(context) if req.exclude_seen else None
    return catalogue.banned_codes(req, seen)


# ----------------------------------------------------------------------------- the processor
@dataclass
class _Row:
    req: SidRequest
    prompt_tail: list[int]
    output: list[int]  # vLLM's live list of this request's output tokens
    end_ids: list[int]
    banned: np.ndarray | None = None  # (n, L) SIDs this request excludes


def engine_masker(vllm_config) -> tuple[ServingCatalogue, SidMasker, int | None]:
    """What a logits processor (V1 or Model Runner V2) builds once per engine: the serving
    catalogue (``SIDREC_CHECKPOINT`` or the served model dir), its masker over the model's
    vocabulary, and the tokenizer's EOS id."""
    from transformers import AutoTokenizer

    from sid_tokenizer.vocab import sid_token_ids

    mc = vllm_config.model_config
    catalogue = ServingCatalogue(os.environ.get(ENV_CHECKPOINT) or mc.model)
    tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
    masker = SidMasker(
        catalogue, sid_token_ids(tokenizer, catalogue.index.vocab), vocab_size=mc.get_vocab_size()
    )
    return catalogue, masker, tokenizer.eos_token_id


class SidTrieLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor enforcing the catalogue's SID trie on requests that ask for it."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.catalogue, self.masker, self.eos_token_id = engine_masker(vllm_config)
        self.device = device
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        req = parse_sid_args(sampling_params.extra_args)
        if req is None or not req.constrained:
            return
        cat = frontend_catalogue()
        if cat is not None:
            cat.check(req, cat.banned_codes(req))

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is the argmax: must also run for greedy requests

    def _new_row(self, params, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
        try:
            req = parse_sid_args(params.extra_args)
        except ValueError as e:  # validate_params rejects these; an engine used directly may not
            logger.warning("ignoring request with bad sid arguments: %s", e)
            return None
        if req is None:
            return None
        tail = list(prompt_ids[len(prompt_ids) - req.prefix_len :]) if req.prefix_len and prompt_ids else []
        end_ids = set(getattr(params, "all_stop_token_ids", None) or ())
        if self.eos_token_id is not None:
            end_ids.add(self.eos_token_id)
        banned = request_banned_codes(self.catalogue, self.masker, req, prompt_ids)
        return _Row(req, tail, output_ids, sorted(end_ids), banned)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return  # output lists are live references: nothing to do between steps
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            row = self._new_row(params, prompt_ids, output_ids)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b
        if batch_update.added:
            self.catalogue.refresh()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """In place: ``sid_logprobs`` rows first, then the trie mask (``mask_logits``)."""
        if not self.rows:
            return logits
        n = logits.shape[0]
        batch = [i for i in sorted(self.rows) if i < n]
        rows = [self.rows[i] for i in batch]
        cons = [k for k, r in enumerate(rows) if r.req.constrained]
        return mask_logits(
            logits,
            self.masker,
            logprob_rows=[i for i, r in zip(batch, rows, strict=True) if r.req.logprobs],
            rows=[batch[k] for k in cons],
            reqs=[rows[k].req for k in cons],
            generated=[
                rows[k].prompt_tail + rows[k].output if rows[k].prompt_tail else rows[k].output for k in cons
            ],
            end_ids=[rows[k].end_ids for k in cons],
            banned=[rows[k].banned for k in cons],
        )


def mask_logits(
    logits: torch.Tensor,
    masker: SidMasker,
    logprob_rows: Sequence[int],
    rows: Sequence[int],
    reqs: Sequence[SidRequest],
    generated: Sequence[Sequence[int]],
    end_ids: Sequence[Sequence[int]],
    banned: Sequence[np.ndarray | None] | None = None,
) -> torch.Tensor:
    """In place on ``logits`` (n, V), shared by the V1 and the Model Runner V2 processors.

    ``logprob_rows`` become ``log_softmax`` rows; then each constrained row ``rows[k]`` (request
    ``reqs[k]``, SID tokens so far ``generated[k]``, end tokens ``end_ids[k]``, SIDs it excludes
    ``banned[k]``: ``request_banned_codes``) keeps only the
    tokens its trie allows (only its end tokens once complete): the allowed (row, token) values
    are gathered, the constrained rows filled with -inf and the values scattered back (one pass
    over those rows, no (B, V) boolean mask)."""
    n = logits.shape[0]
    device = logits.device
    if len(logprob_rows) == n:
        logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    elif logprob_rows:
        idx = torch.as_tensor(list(logprob_rows), device=device)
        part = logits.index_select(0, idx)
        logits.index_copy_(0, idx, part - torch.logsumexp(part, dim=-1, keepdim=True))
    if not rows:
        return logits
    if banned is not None and all(b is None for b in banned):
        banned = None
    ar, at, end = masker.allowed(reqs, generated, banned)
    global_rows = np.asarray(rows, dtype=np.int64)
    ends = [end_ids[e] for e in end.tolist()]
    end_r = np.repeat(global_rows[end], [len(e) for e in ends]) if len(end) else np.zeros(0, np.int64)
    end_t = np.asarray([t for e in ends for t in e], dtype=np.int64)
    r_idx = torch.from_numpy(np.concatenate([global_rows[ar], end_r])).to(device, non_blocking=True)
    t_idx = torch.from_numpy(np.concatenate([at, end_t])).to(device, non_blocking=True)
    kept = logits[r_idx, t_idx]
    if len(rows) == n:
        logits.fill_(float("-inf"))
    else:
        logits.index_fill_(0, torch.from_numpy(global_rows).to(device), float("-inf"))
    logits[r_idx, t_idx] = kept
    return logits


# ----------------------------------------------------------------------------- prompt guard
_SID_RUN = re.compile(r"(?:<[a-z]_\d+>)+")
_SID_TOKEN = re.compile(r"<[a-z]_\d+>")


def unknown_sids(text: str, catalogue: ServingCatalogue, allow_partial_tail: int = 0) -> list[str]:
    """SID-looking runs in ``text`` that are not catalogue SIDs (malformed or unknown), in order.

    A run of SID tokens must split into whole SIDs of the catalogue; ``allow_partial_tail``
    tokens at the very end of the text may be an unfinished SID (beam-search prefixes).
    """
    vocab = catalogue.index.vocab
    L = vocab.num_levels
    known = catalogue.index.sid_to_items
    bad: list[str] = []
    for m in _SID_RUN.finditer(text):
        toks = _SID_TOKEN.findall(m.group(0))
        tail = len(toks) % L
        if tail and not (m.end() == len(text.rstrip()) and tail <= allow_partial_tail):
            bad.append(m.group(0))
            continue
        for s in range(0, len(toks) - tail, L):
            sid = "".join(toks[s : s + L])
            try:
                codes = vocab.parse(sid)
            except ValueError:
                bad.append(sid)
                continue
            if codes not in known:
                bad.append(sid)
    return bad


def _request_texts(body: dict) -> list[str]:
    texts: list[str] = []
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    return texts


def _token_prompts(body: dict) -> list[list[int]]:
    """Completion prompts given as token ids (a list of ints or a list of such lists)."""

    def is_ids(x: Any) -> bool:
        return (
            isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )

    prompt = body.get("prompt")
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if is_ids(p)]
    return []


def prompt_problems(
    token_ids: Sequence[int], catalogue: ServingCatalogue, masker: SidMasker, allow_partial_tail: int = 0
) -> str | None:
    """The guard's message for a token-id prompt mentioning non-catalogue SIDs (None if fine):
    the ids are decoded and checked like a text prompt, so both forms get the same answer."""
    vocab_size = len(masker.tokenizer)
    if any(t < 0 or t >= vocab_size for t in token_ids):
        return None  # vLLM rejects out-of-vocabulary ids itself
    text = masker.tokenizer.decode(list(token_ids), skip_special_tokens=False)
    bad = unknown_sids(text, catalogue, allow_partial_tail)
    return _unknown_message(bad, catalogue) if bad else None


def _unknown_message(bad: list[str], cat: ServingCatalogue) -> str:
    shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (
        f"the prompt mentions {len(bad)} SID(s) that are not catalogue items: {shown} "
        f"(catalogue: {cat.dir}, {len(cat.index)} items; a SID is {cat.num_levels} tokens "
        f"like {cat.index.sid(int(cat.active_items[0]))})"
    )


def _sid_alphabet(cat: ServingCatalogue) -> set[str]:
    vocab = cat.index.vocab
    return set("".join(vocab.token(lv, 0) for lv in range(vocab.num_levels))) | set("0123456789")


def constrained_option_problem(
    body: dict, req: SidRequest, cat: ServingCatalogue, masker: SidMasker | None
) -> tuple[str, str] | None:
    """(message, param) for a request option that would break a constrained answer, else None.

    The constraint fixes the completion to ``sid_count`` whole catalogue SIDs followed by EOS.
    Options that restrict tokens too (structured outputs, tools, ``allowed_token_ids``,
    ``bad_words``) would leave rows with nothing allowed (HTTP 500 or empty answers); stop
    strings/tokens that can occur inside a SID, a ``max_tokens`` below the SIDs' length,
    ``min_tokens`` beyond it or ``ignore_eos`` cut or pad the SIDs; ``top_logprobs`` list the
    unconstrained model's alternatives (forbidden tokens); ``echo`` and
    ``continue_final_message`` mix prompt text into the answer."""
    need = req.count * cat.num_levels
    why = "cannot be combined with the SID constraint (vllm_xargs.sid_constrained)"
    rf = body.get("response_format")
    rf_type = rf.get("type") if isinstance(rf, dict) else rf
    if rf is not None and rf_type not in (None, "text"):
        return f"response_format {rf_type!r} {why}: the answer is SIDs, not JSON", "response_format"
    if body.get("structured_outputs") not in (None, {}):
        return f"structured_outputs {why}: both restrict the output tokens", "structured_outputs"
    if body.get("tools") and body.get("tool_choice") not in (None, "none"):
        return f"tools {why}: tool calls are not SIDs (tool_choice 'none' is accepted)", "tools"
    if body.get("allowed_token_ids") is not None:
        return (
            f"allowed_token_ids {why}: the constraint already decides the allowed tokens "
            "(use vllm_xargs.sid_items / sid_category to restrict items)",
            "allowed_token_ids",
        )
    if body.get("bad_words"):
        return f"bad_words {why} (use vllm_xargs.sid_exclude to block items)", "bad_words"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    alphabet = _sid_alphabet(cat)
    for st in stops:
        if isinstance(st, str) and st and set(st) <= alphabet:  # SIDs decode without whitespace
            return f"stop string {st!r} can occur inside a SID and would cut it; {why}", "stop"
    ids = body.get("stop_token_ids")
    if isinstance(ids, list) and masker is not None:
        sid_tokens = {int(t) for lv in masker.level_token_ids for t in lv}
        hit = [t for t in ids if isinstance(t, int) and t in sid_tokens]
        if hit:
            return f"stop_token_ids {hit[:5]} are SID tokens and would cut a SID; {why}", "stop_token_ids"
    if _truthy(body.get("ignore_eos")):
        return f"ignore_eos {why}: after the SIDs only EOS is allowed", "ignore_eos"
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v < need:
            return (
                f"{key}={v} is below the {need} tokens of sid_count={req.count} SID(s) of "
                f"{cat.num_levels} tokens: the answer would end inside a SID",
                key,
            )
    v = body.get("min_tokens")
    if isinstance(v, int) and not isinstance(v, bool) and v > need:
        return (
            f"min_tokens={v} exceeds the {need} tokens of sid_count={req.count} SID(s): after them "
            "only EOS is allowed",
            "min_tokens",
        )
    top = body.get("top_logprobs")
    if "messages" not in body:  # completions: logprobs=N asks for the N best alternatives
        top = body.get("logprobs")
    if isinstance(top, int | float) and not isinstance(top, bool) and top > 0:
        return (
            f"top_logprobs/logprobs={top} would list the unconstrained model's alternatives, "
            f"tokens the SID constraint forbids; ask {RANK_ROUTE} for scored items (or logprobs=0 / "
            "top_logprobs=0 for the chosen tokens' log-probabilities)",
            "top_logprobs" if "messages" in body else "logprobs",
        )
    if _truthy(body.get("echo")):
        return f"echo {why}: the answer would start with the prompt's SIDs", "echo"
    if _truthy(body.get("continue_final_message")):
        return (
            f"continue_final_message {why}: a constrained answer starts a new SID",
            "continue_final_message",
        )
    return None


RANK_ROUTE = "/v1/sid/rank"
INFO_ROUTE = "/v1/sid/info"
ENV_LAUNCH_TOKEN = "SIDREC_LAUNCH_TOKEN"


def _info():
    from starlette.responses import JSONResponse

    cat = frontend_catalogue()
    return JSONResponse(
        {
            "launch_token": os.environ.get(ENV_LAUNCH_TOKEN),
            "pid": os.getpid(),
            "checkpoint": _frontend_path(),
            "items": len(cat.index) if cat else None,
            "active_items": len(cat.active_items) if cat else None,
        }
    )


async def sid_prompt_guard(request, call_next):
    """ASGI middleware (``--middleware sid_tokenizer.vllm_processor.sid_prompt_guard``).

    On chat and completion requests: HTTP 400 naming the problem for a prompt (text or token
    ids) mentioning a SID that is not in the catalogue, for bad ``sid_*`` arguments in
    ``vllm_xargs`` (also with ``stream: true``), for request options that would break a
    constrained answer (``constrained_option_problem``), for ``use_beam_search`` with the
    constraint on (vLLM's beam search skips logits processors) and for JSON nested too deeply to
    parse. Everything else goes on to vLLM unchanged. It also answers ``POST /v1/sid/rank``
    (``sid_tokenizer.vllm_rank``: the constrained top-K with scores) and ``GET /v1/sid/info``
    (which launch this server is: ``SIDREC_LAUNCH_TOKEN``, pid, catalogue size)."""
    path = request.url.path
    if request.method == "GET" and path.endswith(INFO_ROUTE):
        return _info()
    is_rank = request.method == "POST" and path.endswith(RANK_ROUTE)
    if request.method != "POST":
        return await call_next(request)
    if not is_rank and not path.endswith(("/chat/completions", "/completions")):
        return await _other_route(request, call_next)
    cat = frontend_catalogue()
    if cat is None:
        if is_rank:
            return _bad_request(f"this server has no sidrec catalogue ({ENV_CHECKPOINT})", None)
        return await call_next(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        if is_rank:
            return _bad_request("the request body is not valid JSON", "body")
        return await call_next(request)  # let vLLM report malformed JSON itself
    except RecursionError:  # json.loads would raise it again inside vLLM: HTTP 500
        return _bad_request("the request body nests JSON too deeply", "body")
    if is_rank:
        from sid_tokenizer.vllm_rank import handle_rank

        return await handle_rank(request, body)
    if not isinstance(body, dict):
        return await call_next(request)
    xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else {}
    masker = frontend_masker()
    token_prompts = _token_prompts(body)
    # validate_params checks these too, but for stream=true vLLM answers its ValueError with
    # HTTP 200 and an error event: checking here gives every bad request a 400 before streaming
    try:
        req = parse_sid_args(xargs)
        if req is not None and req.constrained:
            seen = None
            if req.exclude_seen:
                vocab = cat.index.vocab
                found = [c for t in _request_texts(body) for c in vocab.find_all(t)]
                if masker is not None:
                    found += [tuple(c) for p in token_prompts for c in masker.sids_in_tokens(p).tolist()]
                seen = np.asarray(found, dtype=np.int64).reshape(-1, cat.num_levels)
            cat.check(req, cat.banned_codes(req, seen))
    except ValueError as e:
        return _bad_request(str(e), "vllm_xargs")
    partial = req.prefix_len if req is not None else 0
    if req is not None and req.constrained:
        if _truthy(body.get("use_beam_search")):
            return _bad_request(
                "use_beam_search does not run logits processors (vLLM issue #21546), so the SID "
                f"constraint would be ignored; POST {RANK_ROUTE} returns the constrained top-K with "
                "scores, vllm_xargs.sid_count asks for distinct items",
                "use_beam_search",
            )
        problem = constrained_option_problem(body, req, cat, masker)
        if problem is not None:
            return _bad_request(*problem)
    bad = [s for text in _request_texts(body) for s in unknown_sids(text, cat, partial)]
    if bad:
        return _bad_request(_unknown_message(bad, cat), "messages" if "messages" in body else "prompt")
    if masker is not None:
        for ids in token_prompts:
            problem = prompt_problems(ids, cat, masker, partial)
            if problem:
                return _bad_request(problem, "prompt")
    if req is not None and req.rank:
        from sid_tokenizer.vllm_rank import handle_openai_rank

        return await handle_openai_rank(request, body, req, "messages" in body)
    return await call_next(request)


GUARDED_ROUTES = ("/v1/chat/completions", "/v1/completions", RANK_ROUTE)


async def _other_route(request, call_next):
    """vLLM's other generation routes (``/v1/responses``, ``/v1/messages``, ``/invocations``,
    ``/v1/chat/completions/batch``, ``/inference/v1/generate``, ...) also pass ``vllm_xargs`` /
    ``extra_args`` to the engine, but without the checks above: a request there that switches the
    SID processor on is refused (400) instead of reaching it unchecked."""
    if "json" not in request.headers.get("content-type", "json"):
        return await call_next(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, RecursionError):
        return await call_next(request)
    if not isinstance(body, dict):
        return await call_next(request)
    sp = body.get("sampling_params") if isinstance(body.get("sampling_params"), dict) else {}
    found = [
        k
        for xargs in (body.get("vllm_xargs"), sp.get("extra_args"))
        if isinstance(xargs, dict)
        for k in xargs
        if str(k).lower().startswith("sid")
    ]
    if found and frontend_catalogue() is not None:
        return _bad_request(
            f"the SID processor arguments {sorted(found)[:5]} are served on {', '.join(GUARDED_ROUTES)} only "
            f"(this route, {request.url.path}, does not run the checks a constrained request needs)",
            "vllm_xargs",
        )
    return await call_next(request)


def _truthy(value: Any) -> bool:
    """A request flag as pydantic reads it (lax: 1, "true", "yes", ...)."""
    if value is None or value is False:
        return False
    return str(value).strip().lower() not in ("0", "0.0", "false", "f", "no", "n", "off", "")


def _bad_request(message: str, param: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(
        status_code=400,
        content={"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}},
    )
