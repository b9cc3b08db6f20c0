"""Bad input: each case is a DataError naming the file, the field and the line or key, and a
failed ``prepare`` leaves nothing behind (no output directory, or the earlier one unchanged).

The bring-your-own-data (generic format) validation errors are in tests/test_own_data.py.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.embed import load_embeddings
from data_prep.io import DataError, read_json
from data_prep.loaders.amazon import load_amazon
from data_prep.loaders.minionerec import load_minionerec
from data_prep.prepare import PrepareArgs, prepare
from sid_tokenizer.sid import SidFormatError, SidIndex, SidVocab

# --- helpers ---------------------------------------------------------------------------------

ITEMS = {
    str(i): {"title": f"Item {i}", "description": f"['About item {i}']", "brand": "B", "categories": ""}
    for i in range(6)
}
INTER = {"u1": [0, 1, 2, 3], "u2": [1, 2, 3, 4], "u3": [2, 3, 4, 5]}


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def lcrec_files(tmp: Path, inter: dict | None = None, items: dict | None = None) -> tuple[Path, Path]:
    return (
        write_json(tmp / "X.inter.json", INTER if inter is None else inter),
        write_json(tmp / "X.item.json", ITEMS if items is None else items),
    )


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_prepare_fails(args: PrepareArgs, *parts: str) -> DataError:
    """``prepare(args)`` raises a DataError containing ``parts``; nothing partial is left behind."""
    out = Path(args.output_dir)
    before = snapshot(out) if out.exists() else None
    siblings = set(out.parent.iterdir()) if out.parent.exists() else set()
    with pytest.raises(DataError) as info:
        prepare(args)
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before
    if out.parent.exists():
        assert set(out.parent.iterdir()) == siblings, "temporary directories left behind"
    return info.value


def lcrec_args(tmp: Path, inter: Path, items: Path | None) -> PrepareArgs:
    return PrepareArgs(
        format="lcrec",
        inter_path=str(inter),
        item_path=str(items) if items else None,
        output_dir=str(tmp / "out" / "dataset"),
        embed=False,
    )


# --- LC-Rec json -----------------------------------------------------------------------------


def test_malformed_json_names_line(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path)
    inter.write_text('{\n "u1": [0, 1, 2],\n "u2": [1, 2 3]\n}\n')
    assert_prepare_fails(lcrec_args(tmp_path, inter, items), "X.inter.json:3", "malformed JSON")


def test_item_missing_from_catalogue(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path, inter={**INTER, "u4": [0, 1, 99]})
    assert_prepare_fails(
        lcrec_args(tmp_path, inter, items),
        "X.inter.json",
        "key 'u4'",
        "'99'",
        "not in the catalogue",
        "X.item.json",
    )


@pytest.mark.parametrize("history", [[], [3]])
def test_empty_or_one_item_history(tmp_path: Path, history: list[int]) -> None:
    inter, items = lcrec_files(tmp_path, inter={**INTER, "short": history})
    assert_prepare_fails(
        lcrec_args(tmp_path, inter, items),
        "X.inter.json",
        "key 'short'",
        f"history of {len(history)} item(s)",
        "at least 3",
    )


def test_duplicate_item_id(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path)
    text = json.dumps(ITEMS, indent=1).replace('"5": {', '"2": {')  # item 2 listed twice
    items.write_text(text)
    assert_prepare_fails(lcrec_args(tmp_path, inter, items), "X.item.json", "key '2'", "duplicate key")


def test_item_without_title(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path, items={**ITEMS, "4": {"title": "  ", "description": "x"}})
    assert_prepare_fails(
        lcrec_args(tmp_path, inter, items), "X.item.json", "key '4'", "field 'title'", "no title"
    )


@pytest.mark.parametrize("bad", [{"id": 1}, True, 1.5])
def test_wrong_item_id_type(tmp_path: Path, bad: object) -> None:
    inter, items = lcrec_files(tmp_path, inter={**INTER, "u1": [0, bad, 2]})
    assert_prepare_fails(
        lcrec_args(tmp_path, inter, items), "X.inter.json", "key 'u1'", "position 1", "expected int or string"
    )


def test_wrong_top_level_type(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path, inter=[[0, 1, 2]])  # type: ignore[arg-type]
    assert_prepare_fails(lcrec_args(tmp_path, inter, items), "X.inter.json", "expected an object")


def test_failed_prepare_keeps_earlier_good_output(tmp_path: Path) -> None:
    inter, items = lcrec_files(tmp_path)
    args = lcrec_args(tmp_path, inter, items)
    prepare(args)
    good = read_json(Path(args.output_dir) / "meta.json")
    assert good["counts"]["users"] == 3
    inter.write_text('{"u1": [0, 1, 2], "u2": [0, 7, 8]}')  # 7, 8 unknown
    assert_prepare_fails(args, "X.inter.json", "key 'u2'", "not in the catalogue")
    assert read_json(Path(args.output_dir) / "meta.json") == good


def test_failure_after_loading_leaves_nothing(tmp_path: Path) -> None:
    """A SID index that lacks a catalogue item fails after loading, before anything is written."""
    inter, items = lcrec_files(tmp_path)
    index = write_json(tmp_path / "X.index.json", {str(i): ["<a_1>", f"<b_{i}>"] for i in range(5)})
    args = lcrec_args(tmp_path, inter, items)
    args.sid_index_path = str(index)
    assert_prepare_fails(args, "X.index.json", "key '5'", "no SID")


# --- SIDs and embeddings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sid", "expected"),
    [
        ("<a_1><b_2>", "has 2 tokens, expected 3"),
        ("<a_1><c_2><b_3>", "expected level 'b'"),
        ("a_1 b_2 c_3", "is not a SID"),
        ("<a_1><b_2><c_300>", "exceeds codebook size 256"),
    ],
)
def test_sid_string_of_wrong_shape(sid: str, expected: str) -> None:
    with pytest.raises(SidFormatError, match=expected):
        SidVocab((256, 256, 256)).parse(sid)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (["<a_1>", "<c_2>"], "token 2 is '<c_2>', expected <b_N>"),
        (["a_1", "b_2"], "token 1 is 'a_1'"),
        (["<a_1>", "<b_2>", "<c_3>"], "SID has 3 levels, others have 2"),
        ("not a list", "expected a list of SID tokens"),
    ],
)
def test_sid_index_of_wrong_shape(tmp_path: Path, entry: object, expected: str) -> None:
    path = write_json(tmp_path / "X.index.json", {"0": ["<a_1>", "<b_1>"], "1": entry})
    with pytest.raises(DataError) as info:
        SidIndex.load(path, raw_ids=["0", "1"])
    assert "X.index.json" in str(info.value) and "key '1'" in str(info.value)
    assert expected in str(info.value)


def test_embedding_rows_do_not_match_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "emb.npy"
    np.save(path, np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"emb\.npy: 5 embedding rows but the catalogue has 6 items"):
        load_embeddings(path, num_items=6)
    np.save(path, np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match="expected a 2-d array"):
        load_embeddings(path, num_items=5)


# --- MiniOneRec csv --------------------------------------------------------------------------

SIDS = {str(i): [f"<a_{i}>", f"<b_{i % 2}>", "<c_0>"] for i in range(6)}
COLUMNS = [
    "user_id",
    "history_item_title",
    "item_title",
    "history_item_id",
    "item_id",
    "history_item_sid",
    "item_sid",
]


def _row(user: str, history: list[int], target: int) -> dict[str, str]:
    return {
        "user_id": user,
        "history_item_title": str([f"Item {i}" for i in history]),
        "item_title": f"Item {target}",
        "history_item_id": str(history),
        "item_id": str(target),
        "history_item_sid": str(["".join(SIDS[str(i)]) for i in history]),
        "item_sid": "".join(SIDS[str(target)]),
    }


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def mini_files(tmp: Path, valid: list[dict] | None = None, test: list[dict] | None = None) -> PrepareArgs:
    write_json(tmp / "X.item.json", ITEMS)
    write_json(tmp / "X.index.json", SIDS)
    valid = valid if valid is not None else [_row("A1", [0], 1), _row("A1", [0, 1], 2), _row("B2", [3], 4)]
    test = test if test is not None else [_row("A1", [0, 1, 2], 3), _row("A1", [0, 1, 2, 3], 5)]
    write_csv(tmp / "valid.csv", valid)
    write_csv(tmp / "test.csv", test)
    return PrepareArgs(
        format="minionerec",
        item_path=str(tmp / "X.item.json"),
        valid_csv=str(tmp / "valid.csv"),
        test_csv=str(tmp / "test.csv"),
        output_dir=str(tmp / "out" / "dataset"),
        embed=False,
    )


def test_minionerec_good_fixture(tmp_path: Path) -> None:
    ds = prepare(mini_files(tmp_path))
    assert ds.user_raw_ids == ["A1", "B2"]
    assert ds.train == [[0, 1, 2], [3, 4]]
    assert ds.sequences == [[0, 1, 2, 3, 5], [3, 4]]
    assert ds.meta["sid_index"] == "sids/index.json"
    assert ds.items[0].description == "About item 0"  # list repr unwrapped


def test_minionerec_csv_missing_column(tmp_path: Path) -> None:
    args = mini_files(tmp_path)
    write_csv(tmp_path / "test.csv", [_row("A1", [0, 1, 2], 3)], [c for c in COLUMNS if c != "item_sid"])
    assert_prepare_fails(args, "test.csv:1", "field 'item_sid'", "missing required column")


def test_minionerec_malformed_list(tmp_path: Path) -> None:
    bad = _row("A1", [0, 1, 2], 3) | {"history_item_id": "[0, 1, 2"}
    args = mini_files(tmp_path, test=[_row("A1", [0, 1], 2), bad])
    assert_prepare_fails(args, "test.csv:3", "field 'history_item_id'", "malformed list")


def test_minionerec_sid_differs_from_index(tmp_path: Path) -> None:
    bad = _row("A1", [0, 1, 2], 3) | {"item_sid": "<a_9><b_9><c_9>"}
    args = mini_files(tmp_path, test=[bad])
    assert_prepare_fails(args, "test.csv:2", "field 'item_sid'", "'<a_9><b_9><c_9>'", "<a_3><b_1><c_0>")


def test_minionerec_history_sid_differs_from_index(tmp_path: Path) -> None:
    bad = _row("A1", [0, 1, 2], 3) | {"history_item_sid": str(["<a_0><b_0><c_0>", "<a_2><b_0><c_0>"])}
    args = mini_files(tmp_path, valid=[bad])
    assert_prepare_fails(args, "valid.csv:2", "field 'history_item_sid'", "position 1")


def test_minionerec_unknown_item_and_wrong_type(tmp_path: Path) -> None:
    args = mini_files(tmp_path, test=[_row("A1", [0], 1) | {"item_id": "77", "item_sid": ""}])
    assert_prepare_fails(args, "test.csv:2", "field 'item_id'", "77 is not in the catalogue")
    args = mini_files(tmp_path, test=[_row("A1", [0], 1) | {"history_item_id": "['x']"}])
    assert_prepare_fails(args, "test.csv:2", "field 'history_item_id'", "'x' is not a non-negative integer")


def test_minionerec_empty_history(tmp_path: Path) -> None:
    args = mini_files(tmp_path, valid=[_row("A1", [], 1)])
    assert_prepare_fails(args, "valid.csv:2", "field 'history_item_id'", "empty history")


def test_minionerec_rows_out_of_order(tmp_path: Path) -> None:
    args = mini_files(tmp_path, valid=[_row("A1", [0, 1], 2), _row("A1", [0], 1)])
    assert_prepare_fails(args, "valid.csv:3", "field 'history_item_id'", "does not continue")


def test_minionerec_index_of_wrong_shape(tmp_path: Path) -> None:
    args = mini_files(tmp_path)
    write_json(tmp_path / "X.index.json", SIDS | {"3": ["<a_3>", "<b_1>", "c_0"]})
    assert_prepare_fails(args, "X.index.json", "key '3'", "token 3 is 'c_0'")


def test_minionerec_loader_needs_its_files(tmp_path: Path) -> None:
    args = mini_files(tmp_path)
    with pytest.raises(DataError, match="nothing.csv: file not found"):
        load_minionerec(args.item_path, tmp_path / "nothing.csv", args.test_csv)


# --- raw Amazon dumps ------------------------------------------------------------------------


def _gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_amazon_malformed_line(tmp_path: Path) -> None:
    reviews = _gz(
        tmp_path / "reviews_X_5.json.gz",
        [json.dumps({"reviewerID": "A", "asin": "B1", "unixReviewTime": 1}), '{"reviewerID": "A", "asin": '],
    )
    meta = _gz(tmp_path / "meta_X.json.gz", [repr({"asin": "B1", "title": "t"})])
    with pytest.raises(DataError, match=r"reviews_X_5\.json\.gz:2: malformed line"):
        load_amazon(reviews, meta)


def test_amazon_missing_and_wrong_fields(tmp_path: Path) -> None:
    meta = _gz(tmp_path / "meta_X.json.gz", [repr({"asin": "B1", "title": "t"})])
    reviews = _gz(
        tmp_path / "X.json.gz",
        [
            json.dumps({"reviewerID": "A", "asin": "B1", "unixReviewTime": 1}),
            json.dumps({"reviewerID": "A", "unixReviewTime": 2}),
        ],
    )
    with pytest.raises(DataError, match=r"X\.json\.gz:2 field 'asin': missing field"):
        load_amazon(reviews, meta)
    reviews = _gz(
        tmp_path / "X.json.gz", [json.dumps({"reviewerID": "A", "asin": "B1", "unixReviewTime": "soon"})]
    )
    with pytest.raises(DataError, match=r"X\.json\.gz:1 field 'unixReviewTime': unparsable timestamp 'soon'"):
        load_amazon(reviews, meta)
    reviews = _gz(
        tmp_path / "X.json.gz", [json.dumps({"reviewerID": ["A"], "asin": "B1", "unixReviewTime": 1})]
    )
    with pytest.raises(DataError, match=r"X\.json\.gz:1 field 'reviewerID': expected a non-empty string id"):
        load_amazon(reviews, meta)


def test_amazon_years_must_match(tmp_path: Path) -> None:
    reviews = _gz(
        tmp_path / "X.jsonl.gz", [json.dumps({"user_id": "A", "parent_asin": "B1", "timestamp": 1})]
    )
    meta = _gz(tmp_path / "meta_X.json.gz", [repr({"asin": "B1", "title": "t", "categories": [["x"]]})])
    with pytest.raises(DataError, match=r"meta_X\.json\.gz:1: metadata looks like Amazon 2014"):
        load_amazon(reviews, meta)


def test_amazon_corrupt_gzip(tmp_path: Path) -> None:
    reviews = tmp_path / "X.json.gz"
    reviews.write_bytes(b"not gzip at all")
    meta = _gz(tmp_path / "meta_X.json.gz", [repr({"asin": "B1", "title": "t"})])
    with pytest.raises(DataError, match=r"X\.json\.gz:1: corrupt or truncated gzip file"):
        load_amazon(reviews, meta)


def test_amazon_empty_after_kcore(tmp_path: Path) -> None:
    reviews = _gz(
        tmp_path / "X.json.gz", [json.dumps({"reviewerID": "A", "asin": "B1", "unixReviewTime": 1})]
    )
    meta = _gz(tmp_path / "meta_X.json.gz", [repr({"asin": "B1", "title": "t"})])
    args = PrepareArgs(
        format="amazon",
        inter_path=str(reviews),
        item_path=str(meta),
        output_dir=str(tmp_path / "out" / "ds"),
        embed=False,
    )
    assert_prepare_fails(args, "X.json.gz", "field 'min_interactions'", "no interactions left", "5-core")
