"""SidVocab parsing/formatting, SidIndex load/save (incl. LC-Rec's real index), SidTrie vs brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.io import DataError
from sid_tokenizer.sid import SidFormatError, SidIndex, SidVocab
from sid_tokenizer.trie import SidTrie
from tests.conftest import SHARED

LCREC_INDEX = SHARED / "amazon18-scientific" / "indexes" / "rkmeans_native" / "Scientific.index.json"


# ---- SidVocab -------------------------------------------------------------------------------
def test_vocab_format_parse_roundtrip():
    vocab = SidVocab((256, 256, 256))
    assert vocab.format([12, 5, 77]) == "<a_12><b_5><c_77>"
    assert vocab.parse("<a_12><b_5><c_77>") == (12, 5, 77)
    assert vocab.parse(["<a_12>", "<b_5>", "<c_77>"]) == (12, 5, 77)
    assert vocab.parse("  <a_0><b_0><c_255>\n") == (0, 0, 255)
    tokens = vocab.tokens()
    assert len(tokens) == 768 and len(set(tokens)) == 768
    assert tokens[0] == "<a_0>" and tokens[-1] == "<c_255>"


@pytest.mark.parametrize(
    "text, message",
    [
        ("<a_1><b_2>", "has 2 tokens, expected 3"),
        ("<a_1><b_2><c_3><d_4>", "has 4 tokens, expected 3"),
        ("<a_1><c_2><b_3>", "expected level 'b'"),
        ("<a_1><b_2><c_256>", "exceeds codebook size 256"),
        ("<a_1> <b_2><c_3>", "is not a SID"),
        ("item <a_1><b_2><c_3>", "is not a SID"),
        ("", "is not a SID"),
        ("<a_-1><b_2><c_3>", "is not a SID"),
        ("<A_1><b_2><c_3>", "is not a SID"),
    ],
)
def test_vocab_parse_errors(text, message):
    with pytest.raises(SidFormatError, match=message):
        SidVocab((256, 256, 256)).parse(text)


def test_vocab_token_and_format_range_errors():
    vocab = SidVocab((4, 8))
    with pytest.raises(SidFormatError, match="out of range"):
        vocab.token(0, 4)
    with pytest.raises(SidFormatError, match="level 2 out of range"):
        vocab.token(2, 0)
    with pytest.raises(SidFormatError, match="has 3 codes, expected 2"):
        vocab.format([1, 2, 3])


def test_vocab_find_all_in_free_text():
    vocab = SidVocab((8, 8, 8))
    text = "user bought <a_1><b_2><c_3>, then <a_7><b_0><c_0> and <a_9><b_0><c_0> (out of range) <a_1><b_2>"
    assert vocab.find_all(text) == [(1, 2, 3), (7, 0, 0)]


# ---- SidIndex -------------------------------------------------------------------------------
def test_index_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(50, 3))
    raw_ids = [f"B00{i:04d}X" for i in range(50)]
    index = SidIndex(codes, SidVocab((16, 16, 16)), raw_ids=raw_ids)
    index.save(tmp_path / "index.json")
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert list(on_disk) == raw_ids
    assert on_disk[raw_ids[3]] == index.sid_tokens(3)
    loaded = SidIndex.load(tmp_path / "index.json", raw_ids=raw_ids, level_sizes=(16, 16, 16))
    np.testing.assert_array_equal(loaded.codes, codes)
    assert loaded.raw_ids == raw_ids
    assert loaded.num_collisions() == len(codes) - len({tuple(r) for r in codes.tolist()})
    assert loaded.items_for(index.sid(7)) == [i for i in range(50) if (codes[i] == codes[7]).all()]


@pytest.mark.skipif(not LCREC_INDEX.exists(), reason=f"LC-Rec index not available at {LCREC_INDEX}")
def test_index_lcrec_real_roundtrip(tmp_path):
    index = SidIndex.load(LCREC_INDEX)
    assert len(index) == 4344
    assert index.vocab.num_levels == 4 and index.vocab.level_sizes == (256, 256, 256, 256)
    raw = json.loads(LCREC_INDEX.read_text())
    assert index.sid_tokens(0) == raw["0"] and index.sid_tokens(4343) == raw["4343"]
    assert index.raw_ids[:3] == ["0", "1", "2"]  # numeric ids keep their numeric order
    assert index.num_collisions() == 4344 - len({tuple(v) for v in raw.values()})
    index.save(tmp_path / "index.json")
    assert json.loads((tmp_path / "index.json").read_text()) == raw
    again = SidIndex.load(tmp_path / "index.json", raw_ids=index.raw_ids, level_sizes=(256,) * 4)
    np.testing.assert_array_equal(again.codes, index.codes)


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_index_load_errors(tmp_path):
    good = {"x": ["<a_1>", "<b_2>"], "y": ["<a_3>", "<b_0>"]}
    with pytest.raises(DataError, match=r"\[key 'z'\].*no SID"):
        SidIndex.load(_write(tmp_path / "i1.json", good), raw_ids=["x", "y", "z"])
    with pytest.raises(DataError, match=r"\[key 'y'\].*token 1 is '<b_3>'"):
        SidIndex.load(_write(tmp_path / "i2.json", {"x": ["<a_1>", "<b_2>"], "y": ["<b_3>", "<a_0>"]}))
    with pytest.raises(DataError, match=r"\[key 'y'\].*1 levels, others have 2"):
        SidIndex.load(_write(tmp_path / "i3.json", {"x": ["<a_1>", "<b_2>"], "y": ["<a_3>"]}))
    with pytest.raises(DataError, match="non-empty object"):
        SidIndex.load(_write(tmp_path / "i4.json", []))
    with pytest.raises(DataError, match=r"\[key 'x'\].*expected a list of SID tokens"):
        SidIndex.load(_write(tmp_path / "i5.json", {"x": "<a_1>junk<b_2>"}))
    with pytest.raises(DataError, match=r"\[key 'y'\].*code 3 at level 'a' exceeds codebook size 2"):
        SidIndex.load(_write(tmp_path / "i6.json", good), level_sizes=(2, 4))
    with pytest.raises(DataError, match="duplicate key"):
        (tmp_path / "i7.json").write_text('{"x": ["<a_1>"], "x": ["<a_2>"]}')
        SidIndex.load(tmp_path / "i7.json")
    # a SID given as one string is accepted when it is only tokens
    loaded = SidIndex.load(_write(tmp_path / "i8.json", {"x": "<a_1><b_2>"}))
    assert loaded.codes.tolist() == [[1, 2]]


# ---- SidTrie vs a brute-force set ----------------------------------------------------------
@pytest.fixture(scope="module")
def random_sids():
    rng = np.random.default_rng(123)
    sizes = (6, 7, 5)
    # clustered first levels so prefixes are shared and some SIDs repeat
    codes = np.stack([rng.integers(0, s, 1500) for s in sizes], axis=1)
    return codes, sizes


def test_trie_contains_and_walk_match_brute_force(random_sids):
    codes, sizes = random_sids
    trie = SidTrie(codes, level_sizes=sizes)
    full = {tuple(r) for r in codes.tolist()}
    assert len(trie) == len(full)
    np.testing.assert_array_equal(trie.walk(codes), trie.leaf_of_item)
    every = np.array(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")).reshape(3, -1).T
    expected = np.array([tuple(r) in full for r in every.tolist()])
    np.testing.assert_array_equal(trie.contains(every), expected)
    for depth in range(1, 3):
        prefixes = {tuple(r[:depth]) for r in codes.tolist()}
        cand = every[:, :depth]
        nodes = trie.walk(cand)
        np.testing.assert_array_equal(nodes >= 0, [tuple(r) in prefixes for r in cand.tolist()])
        # equal prefixes map to the same node, different prefixes to different nodes
        valid = nodes >= 0
        pairs = {(tuple(p), n) for p, n in zip(cand[valid].tolist(), nodes[valid].tolist(), strict=True)}
        assert len({p for p, _ in pairs}) == len({n for _, n in pairs}) == len(pairs) == len(prefixes)


def test_trie_allowed_pairs_match_brute_force(random_sids):
    codes, sizes = random_sids
    trie = SidTrie(codes, level_sizes=sizes)
    rows = codes.tolist()
    rng = np.random.default_rng(5)
    for depth in range(3):
        prefixes = np.array([r[:depth] for r in rows])[rng.integers(0, len(rows), 40)].reshape(40, depth)
        nodes = trie.walk(prefixes)
        nodes[::7] = -1  # invalid beams get nothing
        r_idx, allowed = trie.allowed_pairs(depth, nodes)
        for b in range(40):
            got = sorted(allowed[r_idx == b].tolist())
            if nodes[b] < 0:
                assert got == []
                continue
            want = sorted({r[depth] for r in rows if r[:depth] == prefixes[b].tolist()})
            assert got == want
            np.testing.assert_array_equal(trie.children(depth, int(nodes[b])), want)


def test_trie_step_rejects_out_of_range_codes():
    trie = SidTrie(np.array([[0, 1], [1, 0], [1, 3]]), level_sizes=(2, 4))
    nodes = trie.step(0, np.zeros(4, dtype=np.int64), np.array([0, 1, 2, -1]))
    assert (nodes[:2] >= 0).all() and (nodes[2:] == -1).all()
    # code == level size must not alias the next parent's first child
    n1 = trie.step(0, np.array([0]), np.array([0]))
    assert trie.step(1, n1, np.array([4]))[0] == -1
    assert trie.step(1, np.array([-1]), np.array([1]))[0] == -1
    assert trie.contains(np.array([[1, 3], [0, 0], [0, 1]])).tolist() == [True, False, True]


def test_trie_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        SidTrie(np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        SidTrie(np.array([[0, 5]]), level_sizes=(2, 4))


def test_sid_token_codes_reads_each_column_at_its_level():
    import numpy as np

    from sid_tokenizer.sid import SidTokenCodes

    # level 0 codes 0..2 are tokens 10..12, level 1 codes 0..1 are tokens 20, 21
    codes = SidTokenCodes([np.array([10, 11, 12]), np.array([20, 21])], vocab_size=30)
    got = codes.codes(np.array([[12, 21], [20, 10], [-1, 99], [11, 20]]))
    assert got.tolist() == [[2, 1], [-1, -1], [-1, -1], [1, 0]]
    # columns past the last level wrap around (a history of several SIDs)
    assert codes.codes(np.array([[10, 21, 11, 20]])).tolist() == [[0, 1, 1, 0]]
    assert codes.level(np.array([[10, 20], [12, 5]]), 0).tolist() == [[0, -1], [2, -1]]
