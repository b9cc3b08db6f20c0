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

from sid_tokenizer.constrained import SidConstraint, SidLogitsProcessor
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
        self.constraint = SidConstraint(index, tokenizer, trie=trie)
        self.trie = self.constraint.trie
        self.level_token_ids = self.constraint.level_token_ids
        self.num_levels = self.constraint.num_levels

    def decode_codes(self, generated: np.ndarray) -> list[tuple[int, ...] | None]:
        """(N, L) generated token ids -> SID codes when they form a catalogue SID, else None."""
        return self.constraint.decode_codes(generated)

    @torch.no_grad()
    def rank(
        self,
        prompts: list[str],
        num_beams: int = 20,
        batch_size: int = 16,
        constrained: bool = True,
        progress: bool = True,
        backend: str = "sid_beam",
    ) -> Ranking:
        """Top ``num_beams`` SIDs per prompt (None where a beam is not a catalogue SID).

        backend ``sid_beam`` (default): ``sid_beam_search`` (prefill once per prompt, then
        expand the KV cache to the beams; scores are summed log-probabilities); ``hf``:
        ``model.generate(num_beams=K)`` (prefills every beam copy; same beams, slower; scores
        length-normalised by transformers).
        """
        decode_batch = {"sid_beam": self._beams_sid, "hf": self._beams_hf}.get(backend)
        if decode_batch is None:
            raise ValueError(f"unknown backend {backend!r}: 'sid_beam' or 'hf'")
        model = self.model
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(model.parameters()).device
        all_sids, all_scores = [], []
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="beam search", disable=not progress, leave=False
        ):
            batch = tok(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            proc = None
            if constrained:
                proc = SidLogitsProcessor(
                    self.trie,
                    self.level_token_ids,
                    batch["input_ids"].shape[1],
                    tok.eos_token_id,
                    vocab_size=model.config.vocab_size,
                )
            gen, scores = decode_batch(batch, num_beams, proc)  # (B*K, L) token ids, (B*K,) scores
            sids = self.decode_codes(gen)
            for i in range(0, len(sids), num_beams):
                row_scores = scores[i : i + num_beams]
                all_sids.append(
                    [
                        s if np.isfinite(sc) else None
                        for s, sc in zip(sids[i : i + num_beams], row_scores, strict=True)
                    ]
                )
                all_scores.append(row_scores)
        if was_training:
            model.train()
        return Ranking(all_sids, all_scores)

    def _beams_sid(self, batch, num_beams: int, proc) -> tuple[np.ndarray, list[float]]:
        gen, scores = sid_beam_search(
            self.model, batch["input_ids"], batch["attention_mask"], num_beams, self.num_levels, proc
        )
        return gen.reshape(-1, self.num_levels).cpu().numpy(), scores.reshape(-1).cpu().tolist()

    def _beams_hf(self, batch, num_beams: int, proc) -> tuple[np.ndarray, list[float]]:
        tok = self.tokenizer
        plen = batch["input_ids"].shape[1]
        out = self.model.generate(
            **batch,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=self.num_levels,
            min_new_tokens=self.num_levels,
            do_sample=False,
            early_stopping=True,
            logits_processor=[proc] if proc else [],
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        gen = out.sequences[:, plen : plen + self.num_levels].cpu().numpy()
        if gen.shape[1] < self.num_levels:
            gen = np.pad(gen, ((0, 0), (0, self.num_levels - gen.shape[1])), constant_values=-1)
        return gen, out.sequences_scores.cpu().tolist()

    def to_item_groups(self, ranking: Ranking) -> list[list[list[int]]]:
        """Ranked SIDs -> ranked groups of item ids ([] for an invalid SID)."""
        m = self.index.sid_to_items
        return [[m.get(s, []) if s is not None else [] for s in row] for row in ranking.sids]


@torch.no_grad()
def sid_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    num_levels: int,
    processor: SidLogitsProcessor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for exactly ``num_levels`` tokens, prefilling each prompt once.

    input_ids, attention_mask: (B, P), left-padded. Returns generated tokens (B, K, L) and
    cumulative log-probabilities (B, K), beams sorted best first; beams that could not be
    filled (fewer valid SIDs than K) have score -inf. ``model.generate(num_beams=K)`` runs
    the prompt through the model once per beam; here the prompt's KV cache is computed once
    and repeated K times, which is what makes full-catalogue ranking cheap.
    """
    bsz, plen = input_ids.shape
    k = num_beams
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    if processor is not None:
        logp = processor(input_ids, logp)
    vocab = logp.shape[-1]
    scores, tokens = logp.topk(k, dim=-1)  # (B, K)
    cache.batch_repeat_interleave(k)
    seq = input_ids.repeat_interleave(k, 0)
    mask = attention_mask.repeat_interleave(k, 0)
    last_pos = pos[:, -1].repeat_interleave(k, 0)
    generated = tokens.reshape(-1, 1)
    for _ in range(1, num_levels):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=generated[:, -1:],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        if processor is not None:
            logp = processor(torch.cat([seq, generated], dim=1), logp)
        cand = (scores.reshape(-1, 1) + logp).reshape(bsz, k * vocab)
        scores, flat = cand.topk(k, dim=-1)
        beam = torch.div(flat, vocab, rounding_mode="floor")
        tok = flat % vocab
        rows = (torch.arange(bsz, device=flat.device)[:, None] * k + beam).reshape(-1)
        cache.reorder_cache(rows)
        generated = torch.cat([generated[rows], tok.reshape(-1, 1)], dim=1)
    return generated.reshape(bsz, k, num_levels), scores


def evaluate_examples(
    ranker: SidRanker,
    examples,
    max_history: int = 20,
    num_beams: int = 20,
    batch_size: int = 16,
    constrained: bool = True,
    ks=(1, 3, 5, 10, 20),
    progress: bool = True,
    backend: str = "sid_beam",
) -> dict:
    """Rank the full catalogue for held-out ``Example``s with the raw seq2seq prompt and score
    them with ``eval.metrics.rank_metrics`` (item-level; invalid beams occupy their rank)."""
    from eval.metrics import rank_metrics
    from sid_tokenizer.prompts import seq2seq_prompt

    prompts = [seq2seq_prompt(ranker.index, e.history, max_history) for e in examples]
    ranking = ranker.rank(
        prompts,
        num_beams=num_beams,
        batch_size=batch_size,
        constrained=constrained,
        progress=progress,
        backend=backend,
    )
    result = rank_metrics(ranker.to_item_groups(ranking), [e.target for e in examples], ks=ks)
    result["ranking"] = ranking
    return result
