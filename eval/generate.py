"""Full-catalogue ranking with transformers: (constrained) beam search over SIDs.

``SidRanker`` turns prompts into ranked lists of SIDs (``num_beams`` distinct SIDs per
prompt, best first) and maps them to catalogue items. Under the constraint every beam is a
catalogue SID; without it, beams that are not catalogue SIDs come back as ``None`` (invalid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from sid_tokenizer.constrained import SidLogitsProcessor
from sid_tokenizer.llm import sid_token_ids
from sid_tokenizer.sid import SidIndex
from sid_tokenizer.trie import SidTrie

logger = logging.getLogger(__name__)


@dataclass
class Ranking:
    """Per prompt: ranked SID code tuples (None = not a catalogue SID) and beam scores."""

    sids: list[list[tuple[int, ...] | None]]
    scores: list[list[float]]


class SidRanker:
    def __init__(self, model, tokenizer, index: SidIndex, trie: SidTrie | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.index = index
        self.trie = trie or SidTrie(index.codes, index.vocab.level_sizes)
        self.level_token_ids = sid_token_ids(tokenizer, index.vocab)
        self.num_levels = index.vocab.num_levels
        vocab_size = max(len(tokenizer), int(max(t.max() for t in self.level_token_ids)) + 1)
        self.token_to_code = []
        for ids in self.level_token_ids:
            table = np.full(vocab_size, -1, dtype=np.int64)
            table[ids] = np.arange(len(ids))
            self.token_to_code.append(table)

    def decode_codes(self, generated: np.ndarray) -> list[tuple[int, ...] | None]:
        """(N, L) generated token ids -> SID codes when they form a catalogue SID, else None."""
        out: list[tuple[int, ...] | None] = []
        codes = np.stack([np.where(generated[:, lv] < len(t), t[np.minimum(generated[:, lv], len(t) - 1)], -1)
                          for lv, t in enumerate(self.token_to_code)], axis=1) if generated.shape[1] >= \
            self.num_levels else np.full((len(generated), self.num_levels), -1)
        valid = (codes >= 0).all(1)
        valid[valid] = self.trie.contains(codes[valid])
        for row, ok in zip(codes, valid, strict=True):
            out.append(tuple(int(c) for c in row) if ok else None)
        return out

    @torch.no_grad()
    def rank(self, prompts: list[str], num_beams: int = 20, batch_size: int = 16, constrained: bool = True,
             progress: bool = True) -> Ranking:
        model = self.model
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(model.parameters()).device
        all_sids, all_scores = [], []
        for start in tqdm(range(0, len(prompts), batch_size), desc="beam search", disable=not progress,
                          leave=False):
            batch = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
            plen = batch["input_ids"].shape[1]
            processors = []
            if constrained:
                processors.append(SidLogitsProcessor(self.trie, self.level_token_ids, plen, tok.eos_token_id,
                                                     vocab_size=model.config.vocab_size))
            out = model.generate(**batch, num_beams=num_beams, num_return_sequences=num_beams,
                                 max_new_tokens=self.num_levels, min_new_tokens=self.num_levels,
                                 do_sample=False, early_stopping=True, logits_processor=processors,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            gen = out.sequences[:, plen:plen + self.num_levels].cpu().numpy()
            if gen.shape[1] < self.num_levels:
                gen = np.pad(gen, ((0, 0), (0, self.num_levels - gen.shape[1])), constant_values=-1)
            sids = self.decode_codes(gen)
            scores = out.sequences_scores.cpu().tolist() if out.sequences_scores is not None else \
                [0.0] * len(sids)
            for i in range(0, len(sids), num_beams):
                all_sids.append(sids[i:i + num_beams])
                all_scores.append(scores[i:i + num_beams])
        if was_training:
            model.train()
        return Ranking(all_sids, all_scores)

    def to_item_groups(self, ranking: Ranking) -> list[list[list[int]]]:
        """Ranked SIDs -> ranked groups of item ids ([] for an invalid SID)."""
        m = self.index.sid_to_items
        return [[m.get(s, []) if s is not None else [] for s in row] for row in ranking.sids]
