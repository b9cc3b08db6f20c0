"""Full-catalogue ranking with vLLM: a step-wise beam search over SIDs on ``vllm.LLM``.

vLLM's own beam search does not run logits processors (it issues plain one-token requests
without ``extra_args``), so the top-K distinct catalogue items come from this loop instead:
for level ``d = 0..L-1`` every live beam becomes one request ``prompt + beam prefix`` with
``max_tokens=1`` and ``logprobs=K``; ``SidTrieLogitsProcessor`` (``sid_prefix_len=d``)
masks the children that leave the trie and, with ``sid_logprobs=1``, writes the model's
log-probabilities, which the engine reports unchanged under ``logprobs_mode="processed_logits"``.
Each beam keeps its K best children; the K best of all candidates per prompt survive. This is
the same search as ``eval.generate.sid_beam_search`` (the HF backend), so scores and
beams match up to float noise; prefix caching makes the repeated prompts cheap.

``VllmSidRanker`` has ``SidRanker``'s ``rank``/``to_item_groups`` interface, so
``eval.generate.evaluate_examples`` scores it with the same metrics code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eval.generate import Ranking
from eval.vllm_cpu import whole_prompt_prefill
from sid_tokenizer.constrained import SidConstraint
from sid_tokenizer.sid import SidIndex
from sid_tokenizer.trie import SidTrie
from sid_tokenizer.vllm_processor import ENV_CHECKPOINT, SidTrieLogitsProcessor

logger = logging.getLogger(__name__)

# vLLM reports tokens masked to -inf as a large negative number; anything below is "not allowed".
_MASKED = -1e4


def load_vllm(
    checkpoint: str | Path,
    num_beams: int = 20,
    dtype: str = "float32",
    max_model_len: int = 1024,
    max_num_seqs: int = 256,
    kv_cache_gib: int = 1,
    seed: int = 0,
    enforce_eager: bool = True,
    gpu_memory_utilization: float | None = None,
    warmup: bool = True,
    **engine_kwargs,
):
    """A ``vllm.LLM`` on a sidrec checkpoint, set up for ``VllmSidRanker``.

    ``kv_cache_gib`` sets ``VLLM_CPU_KVCACHE_SPACE`` (CPU builds); ``gpu_memory_utilization``
    is passed on GPU. The processor finds the catalogue through ``SIDREC_CHECKPOINT``, set while
    the engine starts and restored afterwards. On CPU prompts are prefilled whole (no chunking).
    """
    from vllm import LLM

    # the engine's processes read SIDREC_CHECKPOINT while LLM() builds them; the caller's value
    # is restored afterwards, so a later engine or server in this process is not pointed here
    previous = os.environ.get(ENV_CHECKPOINT)
    os.environ[ENV_CHECKPOINT] = str(checkpoint)
    # GPU vLLM defaults to Model Runner V2, whose loader rejects V1 logits processors: V1 unless
    # the caller asks for V2 (VLLM_USE_V2_MODEL_RUNNER=1), then the V2 class
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    processor = SidTrieLogitsProcessor
    if os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1":
        from sid_tokenizer.vllm_processor_v2 import SidTrieLogitsProcessorV2

        processor = SidTrieLogitsProcessorV2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
    kwargs = dict(
        model=str(checkpoint),
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        enforce_eager=enforce_eager,
        enable_prefix_caching=True,
        logits_processors=[processor],
        logprobs_mode="processed_logits",
        max_logprobs=max(20, num_beams),
    )
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(whole_prompt_prefill(max_model_len))  # CPU: whole prompts, as recipes.server
    kwargs.update(engine_kwargs)
    try:
        llm = LLM(**kwargs)
    finally:
        if previous is None:
            os.environ.pop(ENV_CHECKPOINT, None)
        else:
            os.environ[ENV_CHECKPOINT] = previous
    if warmup:  # the first constrained logprobs step costs seconds (lazy init in the worker): pay it here
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, logprobs=1, extra_args={"sid_constrained": 1, "sid_logprobs": 1}
        )
        llm.generate(["warm-up"], params, use_tqdm=False)
    return llm


def shutdown_vllm(llm) -> None:
    """Stop the engine's worker processes now instead of at garbage collection."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


class VllmSidRanker:
    """Top-K SIDs per prompt with a ``vllm.LLM`` built by ``load_vllm`` (same API as ``SidRanker``)."""

    def __init__(self, llm, tokenizer, index: SidIndex, trie: SidTrie | None = None) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.index = index
        self.constraint = SidConstraint(index, tokenizer, trie=trie)
        self.trie = self.constraint.trie
        self.num_levels = self.constraint.num_levels
        self.level_token_ids = self.constraint.level_token_ids

    def rank(
        self,
        prompts: list[str],
        num_beams: int = 20,
        batch_size: int = 256,
        constrained: bool = True,
        progress: bool = True,
        backend: str | None = None,
    ) -> Ranking:
        """Top ``num_beams`` SIDs per prompt, best first (``backend`` is accepted for
        ``evaluate_examples`` compatibility and ignored). ``batch_size`` prompts go to the
        engine together (times ``num_beams`` requests per level)."""
        sids: list[list[tuple[int, ...] | None]] = []
        scores: list[list[float]] = []
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="vllm beam search", disable=not progress, leave=False
        ):
            s, sc = self._rank_batch(prompts[start : start + batch_size], num_beams, constrained)
            sids += s
            scores += sc
        return Ranking(sids, scores)

    def _rank_batch(self, prompts: list[str], k: int, constrained: bool):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        # beams[p]: list of (token prefix, cumulative log-probability), best first
        beams: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in prompts]
        for d in range(self.num_levels):
            extra = {"sid_logprobs": 1}
            if constrained:
                extra.update(sid_constrained=1, sid_prefix_len=d)
            # flat logprobs: plain lists instead of a Logprob object per token (the main cost on CPU);
            # skip_clone: shallow per-request copies (as vLLM's own beam search does)
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=k,
                flat_logprobs=True,
                skip_clone=True,
                detokenize=False,
                skip_special_tokens=False,
                extra_args=extra,
            )
            owners = [(p, b) for p, row in enumerate(beams) for b in range(len(row))]
            requests = [
                TokensPrompt(prompt_token_ids=prompt_ids[p] + list(beams[p][b][0])) for p, b in owners
            ]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            cands: list[list[tuple[float, int, int]]] = [[] for _ in prompts]
            for (p, b), out in zip(owners, outputs, strict=True):
                flat = out.outputs[0].logprobs  # FlatLogprobs of one position: sampled + top-k
                s, e = flat.start_indices[0], flat.end_indices[0]
                base = beams[p][b][1]
                # the sampled token comes first and again among the top-k: dict() drops the repeat
                for tok, v in dict(zip(flat.token_ids[s:e], flat.logprobs[s:e], strict=True)).items():
                    if v > _MASKED and np.isfinite(v):
                        cands[p].append((base + v, b, tok))
            new_beams = []
            for p, cs in enumerate(cands):
                cs.sort(key=lambda c: (-c[0], c[1], c[2]))
                new_beams.append([(beams[p][b][0] + (tok,), s) for s, b, tok in cs[:k]])
            beams = new_beams
        all_sids, all_scores = [], []
        for row in beams:
            gen = np.asarray([b[0] for b in row], dtype=np.int64).reshape(len(row), self.num_levels)
            codes = self.decode_codes(gen)
            pad = k - len(row)
            all_sids.append(codes + [None] * pad)
            all_scores.append([b[1] for b in row] + [float("-inf")] * pad)
        return all_sids, all_scores

    def decode_codes(self, generated: np.ndarray) -> list[tuple[int, ...] | None]:
        """(N, L) token ids -> SID code tuples where they form a catalogue SID, else None."""
        return self.constraint.decode_codes(generated)

    def to_item_groups(self, ranking: Ranking) -> list[list[list[int]]]:
        """Ranked SIDs -> ranked groups of item ids ([] for an invalid SID)."""
        m = self.index.sid_to_items
        return [[m.get(s, []) if s is not None else [] for s in row] for row in ranking.sids]
