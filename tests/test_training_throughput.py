"""Token accounting of benchmarks/training_throughput.py: one causal pass vs sliding windows."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from data_prep.dataset import Example, Item, RecDataset
from recipes.model import build_default_model
from recipes.tasks import build_mixture, tokenize_rows
from sid_tokenizer.prompts import REC_TOKEN, seq2seq_prompt
from sid_tokenizer.sid import SidIndex, SidVocab
from sid_tokenizer.vocab import add_sid_tokens
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_training_throughput", ROOT / "benchmarks" / "training_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy():
    """12 items with 3-level SIDs; training sequences of 1, 2, 5 and 25 items (max_history 20)."""
    items = [Item(item_id=i, raw_id=f"r{i}", title=f"widget number {i}") for i in range(12)]
    train = [[0], [1, 2], [3, 4, 5, 6, 7], [i % 12 for i in range(25)]]
    valid = [Example(user_id=u, history=s, target=8) for u, s in enumerate(train)]
    ds = RecDataset(
        "toy", items, [s + [8, 9] for s in train], [f"u{u}" for u in range(4)], train, valid, valid
    )
    codes = np.stack([np.arange(12) % 4, np.arange(12) // 4, np.arange(12) % 3], 1)
    index = SidIndex(codes, SidVocab((4, 3, 3)), raw_ids=[it.raw_id for it in items])
    model, tok = build_default_model(ds, "tiny")
    add_sid_tokens(model, tok, index.vocab)
    return ds, index, tok


def test_sliding_window_rows_one_per_target_with_capped_history(bench, toy):
    ds, index, _ = toy
    rows = bench.sliding_window_rows(ds, index, max_history=20)
    assert len(rows) == 0 + 1 + 4 + 24
    assert rows[0]["prompt"] == REC_TOKEN + index.sid(1) and rows[0]["completion"] == index.sid(2)
    last = rows[-1]  # target = 25th item, history = the 20 items before it
    seq = ds.train[3]
    assert (
        last["prompt"]
        == seq2seq_prompt(index, seq[:24], 20)
        == REC_TOKEN + "".join(index.sid(i) for i in seq[4:24])
    )
    assert last["completion"] == index.sid(seq[24])


def test_one_pass_and_sliding_windows_supervise_the_same_targets(bench, toy):
    ds, index, tok = toy
    one = bench.token_counts(
        tokenize_rows(build_mixture(ds, index, {"seq2seq": 1.0}, tok, max_history=20), tok)
    )
    sw = bench.token_counts(tokenize_rows(bench.sliding_window_rows(ds, index, 20), tok))
    # 29 next-item targets x 3 SID tokens in both formats
    assert one["target_tokens"] == sw["target_tokens"] == 87
    # one pass: L=2 -> 7, L=5 -> 16, L=25 -> two chunks 64 + 73 (second chunk re-reads 20 context items)
    assert (one["rows"], one["tokens"], one["max_len"]) == (4, 7 + 16 + 64 + 73, 73)
    # sliding: sum over targets of 1 + 3 * (min(t, 20) + 1)
    assert (sw["rows"], sw["tokens"], sw["max_len"]) == (29, 7 + 46 + 966, 64)
    assert bench.seq2seq_tokens_closed_form([len(s) for s in ds.train], 3, 20) == (
        one["tokens"],
        sw["tokens"],
    )


def test_closed_form_grows_linearly_vs_quadratically_until_the_history_cap(bench):
    f = bench.seq2seq_tokens_closed_form
    assert f([20], 3, 20) == (61, 646)
    assert f([10], 3, 20) == (31, 171)
    assert f([1], 3, 20) == (0, 0)
    ratios = [f([L], 3, 20)[1] / f([L], 3, 20)[0] for L in (5, 10, 20, 100)]
    assert ratios[0] < ratios[1] < ratios[2] and ratios[3] == pytest.approx(10.58, abs=0.01)


def test_epoch_batches_cover_every_row_once(bench):
    lengths = [5, 60, 7, 33, 12, 9, 40, 2, 18, 25, 3]
    batches = bench.epoch_batches(lengths, 4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches].count(4) == 2 and max(lengths[i] for i in batches[0]) == 60
