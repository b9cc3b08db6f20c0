"""The Model Runner V2 SID processor on CPU with real tensors: slot-keyed state, the device token
history of ``req_states`` and ``LogitsContext`` as vLLM 0.32's V2 sampler passes them (no GPU
engine here: the GPU check, benchmarks/gpu_check.sh, serves with it)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from sid_tokenizer.vllm_processor import ENV_CHECKPOINT, SidTrieLogitsProcessor  # noqa: E402
from sid_tokenizer.vllm_processor_v2 import SidTrieLogitsProcessorV2, token_windows  # noqa: E402
from tests.test_vllm import CODES, LEVELS, mini_ckpt  # noqa: E402, F401  (fixture reused)

VOCAB = 320
MAX_REQS, MAX_LEN = 8, 64


class Engine:
    """The slot bookkeeping of vLLM's V2 runner that a logits processor sees: per-slot token
    history on the "device" (all_token_ids, total_len), prompt lengths on the host."""

    def __init__(self, ckpt) -> None:
        self.all_token_ids = torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int32)
        self.total_len = torch.zeros(MAX_REQS, dtype=torch.int32)
        self.prompt_len = np.zeros(MAX_REQS, dtype=np.int32)
        state = LogitsProcRequestState(
            device=torch.device("cpu"),
            max_num_reqs=MAX_REQS,
            vocab_size=VOCAB,
            all_token_ids=SimpleNamespace(gpu=self.all_token_ids),
            prompt_len=SimpleNamespace(np=self.prompt_len, gpu=torch.from_numpy(self.prompt_len)),
            prefill_len=SimpleNamespace(np=self.prompt_len.copy()),
            total_len=SimpleNamespace(gpu=self.total_len),
        )
        mc = SimpleNamespace(
            model=str(ckpt), tokenizer=str(ckpt), trust_remote_code=False, get_vocab_size=lambda: VOCAB
        )
        self.proc = SidTrieLogitsProcessorV2(SimpleNamespace(model_config=mc), state)

    def add(self, slot: int, prompt: list[int], sp: SamplingParams) -> bool:
        self.all_token_ids[slot].zero_()
        self.all_token_ids[slot, : len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
        self.prompt_len[slot] = len(prompt)
        self.total_len[slot] = len(prompt)
        return self.proc.add_request(slot, sp)

    def output(self, slot: int) -> list[int]:
        return self.all_token_ids[slot, int(self.prompt_len[slot]) : int(self.total_len[slot])].tolist()

    def step(self, slots: list[int], gen: torch.Generator) -> torch.Tensor:
        """One decode step for the requests in ``slots`` (row order = batch order): random logits,
        the processor, greedy sampling, tokens committed to the history."""
        idx = torch.tensor(slots, dtype=torch.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=idx,
            idx_mapping=idx,
            idx_mapping_np=np.asarray(slots, dtype=np.int32),
            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
            input_ids=torch.zeros(len(slots), dtype=torch.int32),
            pos=self.total_len[idx.long()] - 1,
            seq_lens_upper_bound_np=self.total_len[idx.long()].numpy().copy(),
        )
        out = self.proc.apply(torch.randn(len(slots), VOCAB, generator=gen), ctx)
        for row, slot in enumerate(slots):
            self.all_token_ids[slot, self.total_len[slot]] = int(out[row].argmax())
            self.total_len[slot] += 1
        return out


def sids(proc, tokens: list[int]) -> list[tuple[int, ...]]:
    L = len(LEVELS)
    codes = proc.masker.codes_of(np.asarray(tokens[: len(tokens) // L * L]).reshape(-1, L))
    return [tuple(int(c) for c in row) for row in codes]


@pytest.fixture(autouse=True)
def _no_leaked_checkpoint(monkeypatch):
    """eval.vllm_backend.load_vllm sets SIDREC_CHECKPOINT for its process; an earlier test's value
    would point these processors at another checkpoint (and tokenizer)."""
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)


def test_it_is_a_v2_processor_that_vllm_would_load():
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert issubclass(SidTrieLogitsProcessorV2, LogitsProcessor)
    loaded = _load_v2_logitsprocs_by_fqcns(["sid_tokenizer.vllm_processor_v2:SidTrieLogitsProcessorV2"])
    assert loaded == [SidTrieLogitsProcessorV2]
    with pytest.raises(ValueError, match="not a subclass"):  # what MRV2 says to the V1 class
        _load_v2_logitsprocs_by_fqcns(["sid_tokenizer.vllm_processor:SidTrieLogitsProcessor"])


def test_token_windows_gathers_each_slots_tail():
    hist = torch.arange(4 * 10, dtype=torch.int32).reshape(4, 10)
    total = torch.tensor([3, 10, 6, 0], dtype=torch.int32)
    got = token_windows(hist, total, np.array([2, 1, 0]), np.array([4, 7, 1]), width=4)
    assert got == [[24, 25], [17, 18, 19], [1, 2]]


def test_constrained_slots_produce_catalogue_sids_then_eos_while_rows_reorder(mini_ckpt):  # noqa: F811 (fixture imported above)
    eng = Engine(mini_ckpt)
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        assert eng.add(0, [1, 2, 3], SamplingParams(extra_args={"sid_constrained": 1}))
        assert not eng.add(3, [4, 5], SamplingParams())
        assert eng.add(5, [6], SamplingParams(extra_args={"sid_constrained": 1, "sid_category": "Lab"}))
        for step in range(4):
            order = [[0, 3, 5], [5, 0, 3], [3, 5, 0], [0, 5, 3]][(trial + step) % 4]  # rows move every step
            out = eng.step(order, g)
            assert torch.isfinite(out[order.index(3)]).all()  # the unconstrained request is untouched
        assert sids(eng.proc, eng.output(0)[:3])[0] in set(CODES)
        assert sids(eng.proc, eng.output(5)[:3])[0] in {CODES[i] for i in (8, 9, 10)}
        assert eng.output(0)[3] == eng.output(5)[3] == eng.proc.eos_token_id


def test_recycled_slot_forgets_its_previous_request(mini_ckpt):  # noqa: F811 (fixture imported above)
    eng = Engine(mini_ckpt)
    assert eng.add(2, [1], SamplingParams(extra_args={"sid_constrained": 1}))
    eng.step([2], torch.Generator().manual_seed(0))
    assert not eng.add(2, [1, 2], SamplingParams())  # a new, unconstrained occupant
    out = eng.step([2], torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all() and eng.proc.slots == {}


def test_distinct_sids_prefix_len_and_logprobs_match_the_v1_processor(mini_ckpt):  # noqa: F811 (fixture imported above)
    """The same requests and logits through V1 (BatchUpdate, live lists) and V2 (slots, device
    history) give the same tokens and the same processed rows."""
    a1 = None
    eng = Engine(mini_ckpt)
    a1 = int(eng.proc.masker.level_token_ids[0][1])
    b2 = int(eng.proc.masker.level_token_ids[1][2])
    reqs = [
        ([7, 8], {"sid_constrained": 1, "sid_items": "P00,P01,P02,P03", "sid_count": 4}),
        ([9, a1, b2], {"sid_constrained": 1, "sid_prefix_len": 2, "sid_logprobs": 1}),
        ([5], {"sid_logprobs": 1}),
        ([4], {}),
    ]
    mc = SimpleNamespace(
        model=str(mini_ckpt), tokenizer=str(mini_ckpt), trust_remote_code=False, get_vocab_size=lambda: VOCAB
    )
    v1 = SidTrieLogitsProcessor(SimpleNamespace(model_config=mc), torch.device("cpu"), False)
    outs = [[] for _ in reqs]
    v1.update_state(
        BatchUpdate(
            batch_size=4,
            removed=[],
            added=[(i, SamplingParams(extra_args=x or None), p, outs[i]) for i, (p, x) in enumerate(reqs)],
            moved=[],
        )
    )
    slots = [6, 1, 4, 0]  # V2 keys by persistent slot, not by row
    for (p, x), s in zip(reqs, slots, strict=True):
        eng.add(s, p, SamplingParams(extra_args=x or None))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(13):
        r1 = v1.apply(torch.randn(4, VOCAB, generator=g1))
        r2 = eng.step(slots, g2)
        torch.testing.assert_close(r1, r2)
        for i in range(4):
            outs[i].append(int(r1[i].argmax()))
    for i, s in enumerate(slots):
        assert eng.output(s) == outs[i]
    assert sorted(sids(eng.proc, eng.output(6)[:12])) == sorted(CODES[:4])
    assert sids(eng.proc, [a1, b2] + eng.output(1)[:1])[0] in {(1, 2, 2), (1, 2, 3)}


def test_spec_decode_rows_are_refused_and_bad_arguments_rejected(mini_ckpt, monkeypatch):  # noqa: F811 (fixture imported above)
    eng = Engine(mini_ckpt)
    eng.add(0, [1], SamplingParams(extra_args={"sid_constrained": 1}))
    idx = torch.tensor([0, 0], dtype=torch.int32)  # two rows for one request: draft tokens
    ctx = LogitsContext(
        idx, idx[:1], np.array([0], dtype=np.int32), torch.tensor([0, 1]), idx, idx, np.array([2])
    )
    with pytest.raises(RuntimeError, match="speculative decoding"):
        eng.proc.apply(torch.zeros(2, VOCAB), ctx)
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    with pytest.raises(ValueError, match="unknown item id"):
        SidTrieLogitsProcessorV2.validate_params(
            SamplingParams(extra_args={"sid_constrained": 1, "sid_items": "NOPE"})
        )


def test_server_and_offline_engine_pick_the_v2_class_under_mrv2(monkeypatch):
    from recipes.server import PROCESSOR, PROCESSOR_V2, ServerConfig

    assert ServerConfig(checkpoint="ckpt").processor() == PROCESSOR
    v2 = ServerConfig(checkpoint="ckpt", env={"VLLM_USE_V2_MODEL_RUNNER": "1"})
    cmd = v2.command()
    assert cmd[cmd.index("--logits-processors") + 1] == PROCESSOR_V2
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert ServerConfig(checkpoint="ckpt").processor() == PROCESSOR_V2
    assert ServerConfig(checkpoint="ckpt", logits_processor="my.mod:Proc").processor() == "my.mod:Proc"


def test_exclusions_match_the_v1_processor(mini_ckpt):  # noqa: F811 (fixture imported above)
    """sid_exclude + sid_exclude_seen: V2 reads the prompt off the device once and bans the same SIDs."""
    eng = Engine(mini_ckpt)
    ids = eng.proc.masker.level_token_ids
    seen = [int(ids[lv][c]) for lv, c in enumerate(CODES[2])]  # the prompt mentions item P02's SID
    prompt = [5, 6, *seen, 7]
    xargs = {"sid_constrained": 1, "sid_exclude": "P00,P01", "sid_exclude_seen": 1, "sid_count": 4}
    mc = SimpleNamespace(
        model=str(mini_ckpt), tokenizer=str(mini_ckpt), trust_remote_code=False, get_vocab_size=lambda: VOCAB
    )
    v1 = SidTrieLogitsProcessor(SimpleNamespace(model_config=mc), torch.device("cpu"), False)
    out1: list[int] = []
    v1.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, SamplingParams(extra_args=xargs), prompt, out1)],
                                moved=[]))  # fmt: skip
    eng.add(3, prompt, SamplingParams(extra_args=xargs))
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(13):
        r1 = v1.apply(torch.randn(1, VOCAB, generator=g1))
        r2 = eng.step([3], g2)
        torch.testing.assert_close(r1, r2)
        out1.append(int(r1[0].argmax()))
    assert eng.output(3) == out1
    produced = sids(eng.proc, eng.output(3)[:12])
    assert len(set(produced)) == 4 and not set(produced) & {CODES[0], CODES[1], CODES[2]}
