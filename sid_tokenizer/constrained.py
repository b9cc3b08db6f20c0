"""Constrained decoding with transformers: every generated SID is a catalogue item.

``SidLogitsProcessor`` masks the logits so that step ``t`` of a completion may only emit a
level-``t`` SID token that extends a valid prefix in the ``SidTrie``; after a full SID only
EOS is allowed. It keeps no state between calls: the trie position of every row is
recomputed from the generated tokens (``input_ids[:, prompt_length:]``), so beam reordering,
several ``generate`` calls and batch changes cannot desynchronise it (unlike a step counter
shared between calls). Masking is a scatter of precomputed CSR index arrays: no per-token
Python loop over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from sid_tokenizer.sid import SidIndex, SidTokenCodes
from sid_tokenizer.trie import SidTrie
from sid_tokenizer.vocab import sid_token_ids


class SidLogitsProcessor(LogitsProcessor):
    def __init__(
        self,
        trie: SidTrie,
        level_token_ids: list[np.ndarray],
        prompt_length: int,
        eos_token_id: int | None,
        vocab_size: int | None = None,
    ) -> None:
        """level_token_ids[l][c]: token id of code c at level l (``vocab.sid_token_ids``).
        prompt_length: width of the (left-padded) prompt batch passed to ``generate``."""
        self.trie = trie
        self.level_token_ids = [torch.as_tensor(t, dtype=torch.long) for t in level_token_ids]
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.token_codes = SidTokenCodes(level_token_ids, vocab_size)

    def nodes_for(self, generated: np.ndarray) -> np.ndarray:
        """generated: (B, t) token ids -> trie node ids at depth t (-1 if off the trie)."""
        nodes = np.zeros(len(generated), dtype=np.int64)
        for d in range(generated.shape[1]):
            nodes = self.trie.step(d, nodes, self.token_codes.level(generated[:, d], d))
        return nodes

    def allowed_indices(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, token ids) of every allowed (row, next token) pair, flattened."""
        t = input_ids.shape[1] - self.prompt_length
        if t < 0:
            raise ValueError(
                f"input is shorter ({input_ids.shape[1]}) than prompt_length {self.prompt_length}"
            )
        batch = input_ids.shape[0]
        if t >= self.trie.num_levels:
            rows = torch.arange(batch)
            eos = torch.full((batch,), self.eos_token_id if self.eos_token_id is not None else -1)
            keep = eos >= 0
            return rows[keep], eos[keep]
        nodes = self.nodes_for(input_ids[:, self.prompt_length :].cpu().numpy())
        rows, codes = self.trie.allowed_pairs(t, nodes)
        rows_t = torch.from_numpy(rows)
        tok_t = self.level_token_ids[t][torch.from_numpy(codes)]
        dead = np.flatnonzero(nodes < 0)
        if len(dead) and self.eos_token_id is not None:  # off-trie rows (impossible under the mask) end
            rows_t = torch.cat([rows_t, torch.from_numpy(dead)])
            tok_t = torch.cat([tok_t, torch.full((len(dead),), self.eos_token_id)])
        return rows_t, tok_t

    def allowed_mask(self, input_ids: torch.LongTensor, vocab_size: int) -> torch.Tensor:
        """Bool (B, vocab_size): True where a token may follow."""
        rows, tok = self.allowed_indices(input_ids)
        mask = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
        mask[rows.to(mask.device), tok.to(mask.device)] = True
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Copy only the allowed scores into a -inf tensor: O(allowed) gathers plus one fill,
        # cheaper than building a (B, V) boolean mask and masked_fill over every entry.
        rows, tok = self.allowed_indices(input_ids)
        rows, tok = rows.to(scores.device), tok.to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[rows, tok] = scores[rows, tok]
        return out


class SidConstraint:
    """The catalogue's SID constraint for one tokenizer: trie, per-level token ids, EOS.

    The one place that builds this set-up; the HF ranker, the offline vLLM ranker and the RL
    trainers all take it from here. A completion is L SID tokens along the trie, then EOS
    (tokens after the (L+1)-th are not constrained: chat templates may add text after EOS).
    """

    def __init__(
        self, index: SidIndex, tokenizer, vocab_size: int | None = None, trie: SidTrie | None = None
    ) -> None:
        self.index = index
        self.trie = trie or SidTrie(index.codes, index.vocab.level_sizes)
        self.level_token_ids = sid_token_ids(tokenizer, index.vocab)
        self.num_levels = index.vocab.num_levels
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = max(
            vocab_size or 0, len(tokenizer), int(max(t.max() for t in self.level_token_ids)) + 1
        )
        self.token_codes = SidTokenCodes(self.level_token_ids, self.vocab_size)

    def processor(self, prompt_length: int) -> SidLogitsProcessor:
        """A logits processor for a left-padded prompt batch of width ``prompt_length``."""
        return SidLogitsProcessor(
            self.trie, self.level_token_ids, prompt_length, self.eos_token_id, vocab_size=self.vocab_size
        )

    def decode_codes(self, generated: np.ndarray) -> list[tuple[int, ...] | None]:
        """(N, >=L) generated token ids -> SID code tuples where the first L form a catalogue
        SID, else None."""
        generated = np.asarray(generated)
        if len(generated) == 0:
            return []
        if generated.ndim != 2 or generated.shape[1] < self.num_levels:
            return [None] * len(generated)
        codes = self.token_codes.codes(generated[:, : self.num_levels])
        valid = (codes >= 0).all(1)
        valid[valid] = self.trie.contains(codes[valid])
        return [tuple(int(c) for c in row) if ok else None for row, ok in zip(codes, valid, strict=True)]

    def allowed(self, completions: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """completions (N, C) token ids (anything after a row's end is ignored) -> bool (N, C, V):
        may token v stand at position t of the completion, given the tokens before it."""
        n, c = completions.shape
        out = torch.ones(n, c, vocab_size, dtype=torch.bool, device=completions.device)
        proc = self.processor(prompt_length=0)
        for t in range(min(c, self.num_levels + 1)):
            out[:, t] = proc.allowed_mask(completions[:, :t], vocab_size)
        return out

    def is_catalogue_sid(self, completions: Sequence[Sequence[int]]) -> np.ndarray:
        """Bool (N,): do the completion's first L tokens form a catalogue SID?"""
        out = np.zeros(len(completions), dtype=bool)
        proc = self.processor(prompt_length=0)
        rows = [i for i, ids in enumerate(completions) if len(ids) >= self.num_levels]
        if rows:
            gen = np.asarray([list(completions[i])[: self.num_levels] for i in rows], dtype=np.int64)
            out[rows] = proc.nodes_for(gen) >= 0
        return out
