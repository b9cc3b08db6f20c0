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

import numpy as np
import torch
from transformers import LogitsProcessor

from sid_tokenizer.sid import SidTokenCodes
from sid_tokenizer.trie import SidTrie


class SidLogitsProcessor(LogitsProcessor):
    def __init__(self, trie: SidTrie, level_token_ids: list[np.ndarray], prompt_length: int,
                 eos_token_id: int | None, vocab_size: int | None = None) -> None:
        """level_token_ids[l][c]: token id of code c at level l (``llm.sid_token_ids``).
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
            raise ValueError(f"input is shorter ({input_ids.shape[1]}) than prompt_length {self.prompt_length}")
        batch = input_ids.shape[0]
        if t >= self.trie.num_levels:
            rows = torch.arange(batch)
            eos = torch.full((batch,), self.eos_token_id if self.eos_token_id is not None else -1)
            keep = eos >= 0
            return rows[keep], eos[keep]
        nodes = self.nodes_for(input_ids[:, self.prompt_length:].cpu().numpy())
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
