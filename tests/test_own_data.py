"""Bring your own data: the guide's command on the shipped example shop, and every validation error."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.dataset import RecDataset
from data_prep.embed import load_embeddings
from data_prep.io import DataError, read_json
from data_prep.kcore import check_split, parse_time
from data_prep.loaders.generic import load_generic, parse_categories
from data_prep.prepare import PrepareArgs, prepare

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "own_data.md"
SHOP = ROOT / "data" / "example_shop"
# What the guide promises for the example shop (docs/own_data.md, "Expected output").
EXPECTED = {
    "users": 29,
    "items": 35,
    "interactions": 221,
    "valid_examples": 29,
    "test_examples": 29,
    "train_sequences": 29,
}


def guide_prepare_command() -> list[str]:
    """The first ``python -m data_prep.prepare`` command in the guide's shell blocks, as written."""
    for line in GUIDE.read_text().splitlines():
        if line.strip().startswith("python -m data_prep.prepare"):
            return shlex.split(line.strip())
    raise AssertionError(f"{GUIDE} has no `python -m data_prep.prepare` command")


def run_guide_command(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the command in a scratch copy of the layout (links to data/ and data_prep/): it writes
    ``outputs/...`` relative to the working directory, as a user's run would, but not into the repo."""
    for name in ("data", "data_prep"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    cmd = guide_prepare_command()
    assert cmd[:3] == ["python", "-m", "data_prep.prepare"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *cmd[1:], *extra], cwd=workdir, capture_output=True, text=True, timeout=600, env=env
    )


def output_dir_of_guide() -> Path:
    cmd = guide_prepare_command()
    config = read_yaml_output_dir(ROOT / cmd[cmd.index("--config") + 1])
    return Path(cmd[cmd.index("--output_dir") + 1]) if "--output_dir" in cmd else config


def read_yaml_output_dir(path: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(path.read_text())["output_dir"])


def test_guide_command_without_embeddings(tmp_path: Path) -> None:
    proc = run_guide_command(tmp_path, "--embed", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / output_dir_of_guide()
    meta = read_json(out / "meta.json")
    assert meta["counts"] == EXPECTED
    assert meta["filtering"]["users_dropped_short"] == 0
    assert meta["filtering"]["duplicate_user_item"] == 3
    assert not (out / "embeddings").exists()
    # the log line the guide shows
    assert f"wrote {output_dir_of_guide()}: {EXPECTED}" in proc.stderr
    guide = GUIDE.read_text()
    assert str(EXPECTED) in guide and "29 users, 35 items, 221 interactions" in guide
    ds = RecDataset.load(out)
    check_split(ds)
    glove = next(it for it in ds.items if it.raw_id == "GLOVE-LINER")  # the item without a description
    assert glove.description == "" and glove.text.startswith("Touchscreen Liner Gloves. Brand: Northwind.")
    assert all(it.extra.keys() == {"price"} for it in ds.items)


@pytest.mark.slow
def test_guide_command_with_embeddings(tmp_path: Path) -> None:
    proc = run_guide_command(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / output_dir_of_guide()
    emb = load_embeddings(out / "embeddings" / "all-MiniLM-L6-v2.npy", num_items=EXPECTED["items"])
    assert emb.shape == (35, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    info = read_json(out / "embeddings" / "all-MiniLM-L6-v2.json")
    assert info["num_items"] == 35 and info["dim"] == 384


# --- options and inputs ----------------------------------------------------------------------

ITEM_COLUMNS = ["item_id", "title", "description", "brand", "categories", "color"]


def write_items(path: Path, rows: list[dict], columns: list[str] = ITEM_COLUMNS) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_inters(
    path: Path,
    rows: list[dict],
    columns: tuple[str, ...] = ("user_id", "item_id", "timestamp", "event", "rating"),
) -> Path:
    return write_items(path, rows, list(columns))


def small_shop() -> tuple[list[dict], list[dict]]:
    """5 items with odd ids, 4 users with 4 events each (ISO, epoch s and epoch ms timestamps)."""
    ids = ["sku 1", "Ünïcode-2", "007", "a/b:c", "x" * 40]
    items = [
        {
            "item_id": i,
            "title": f"Thing {n}",
            "description": f"Desc {n}",
            "brand": "Shop",
            "categories": "Home|Kitchen" if n % 2 else "Home, Garden",
            "color": ["red", "", "blue", "", ""][n],
        }
        for n, i in enumerate(ids)
    ]
    inters = []
    for u, user in enumerate(["alice@example.com", "bob", "42", "user with spaces"]):
        for k in range(4):
            item = ids[(u + k) % 5]
            t = 1_700_000_000 + u * 1000 + k * 86400
            stamp = [str(t), str(t * 1000), "2023-11-16T22:13:20Z", str(t)][k]  # s, ms, ISO (day 2), s
            inters.append(
                {
                    "user_id": user,
                    "item_id": item,
                    "timestamp": stamp,
                    "event": "purchase",
                    "rating": str(3 + k % 3),
                }
            )
    return items, inters


def test_csv_and_jsonl_give_the_same_dataset(tmp_path: Path) -> None:
    items, inters = small_shop()
    a = load_generic(
        write_items(tmp_path / "items.csv", items),
        write_inters(tmp_path / "inter.csv", inters),
        min_interactions=1,
    )
    b = load_generic(
        write_items(tmp_path / "items.jsonl", items),
        write_inters(tmp_path / "inter.jsonl", inters),
        min_interactions=1,
    )
    assert a.items == b.items and a.sequences == b.sequences and a.user_raw_ids == b.user_raw_ids
    assert sorted(a.user_raw_ids) == a.user_raw_ids and "user with spaces" in a.user_raw_ids
    assert [it.raw_id for it in a.items] == sorted(it["item_id"] for it in items)
    assert a.items[0].raw_id == "007"  # numeric-looking ids stay strings
    assert a.num_interactions == 16
    by_id = {it.raw_id: it for it in a.items}
    assert by_id["sku 1"].categories == ["Home", "Garden"]
    assert by_id["Ünïcode-2"].categories == ["Home", "Kitchen"]
    assert by_id["sku 1"].extra == {"color": "red"} and by_id["Ünïcode-2"].extra == {"color": ""}
    check_split(a)


def test_huggingface_dataset_input(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    items, inters = small_shop()
    files = load_generic(
        write_items(tmp_path / "items.csv", items),
        write_inters(tmp_path / "inter.csv", inters),
        min_interactions=1,
        name="shop",
    )
    hf_items = datasets.Dataset.from_list(items)
    hf_inters = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(inters[:9]), "test": datasets.Dataset.from_list(inters[9:])}
    )
    ds = load_generic(hf_items, hf_inters, min_interactions=1, name="shop")
    assert ds.items == files.items and ds.sequences == files.sequences and ds.test == files.test
    both = datasets.DatasetDict({"items": hf_items, "interactions": datasets.Dataset.from_list(inters)})
    assert load_generic(both, min_interactions=1).sequences == files.sequences
    out = tmp_path / "out"
    prepare(PrepareArgs(output_dir=str(out), embed=False), dataset=ds)
    assert read_json(out / "meta.json")["counts"]["interactions"] == 16
    bad = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "timestamp"} for r in inters])
    with pytest.raises(
        DataError, match=r"<datasets.Dataset interactions>:1 field 'timestamp': missing required"
    ):
        load_generic(hf_items, bad)


def test_pandas_dataframe_bom_and_typed_columns(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    items, inters = small_shop()
    ref = load_generic(items, inters, min_interactions=1)
    frame = pd.DataFrame(inters)
    frame["timestamp"] = [pd.Timestamp(parse_time(t, "x"), unit="s") for t in frame["timestamp"]]  # datetimes
    frame["rating"] = frame["rating"].astype(float)
    item_frame = pd.DataFrame(items).replace("", float("nan"))  # empty cells as NaN, as pandas reads them
    ds = load_generic(item_frame, frame, min_interactions=1)
    assert ds.sequences == ref.sequences and [it.raw_id for it in ds.items] == [it.raw_id for it in ref.items]
    assert {it.raw_id: it.extra for it in ds.items} == {it.raw_id: it.extra for it in ref.items}
    numeric = load_generic(
        [{"item_id": n, "title": f"t{n}"} for n in range(3)],
        [{"user_id": 7, "item_id": n, "timestamp": 1_700_000_000 + n} for n in range(3)],
        min_interactions=1,
    )
    assert [it.raw_id for it in numeric.items] == ["0", "1", "2"] and numeric.user_raw_ids == ["7"]
    bom = tmp_path / "items.csv"  # spreadsheet export with a byte-order mark
    write_items(bom, items)
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    assert load_generic(bom, inters, min_interactions=1).sequences == ref.sequences


def test_timestamps_seconds_ms_and_iso_agree() -> None:
    s = parse_time("1700000000", "f")
    assert s == parse_time(1_700_000_000_000, "f") == parse_time("2023-11-14T22:13:20Z", "f")
    assert parse_time("2023-11-14T22:13:20", "f") == s  # no offset: UTC
    assert parse_time("2023-11-14T23:13:20+01:00", "f") == s
    assert parse_time("2023-11-14", "f") == s - 22 * 3600 - 13 * 60 - 20


def test_categories_forms() -> None:
    assert parse_categories(["A", "B"]) == ["A", "B"]
    assert parse_categories("A|B|C") == ["A", "B", "C"]
    assert parse_categories("A, B") == ["A", "B"]
    assert parse_categories('["A", "B & C"]') == ["A", "B & C"]
    assert parse_categories("") == []


def test_events_and_rating_filters(tmp_path: Path) -> None:
    items, inters = small_shop()
    inters[0]["event"] = "view"  # alice: 3 purchases left
    inters[5]["rating"] = "1"  # bob: 3 rated >= 3 left
    inters[10]["rating"] = ""  # no rating: kept
    args = (write_items(tmp_path / "i.csv", items), write_inters(tmp_path / "e.csv", inters))
    ds = load_generic(*args, min_interactions=1, events=["purchase"], min_rating=3)
    f = ds.meta["filtering"]
    assert (f["filtered_event"], f["filtered_rating"], f["users_dropped_short"]) == (1, 1, 0)
    assert ds.num_interactions == 14 and [len(s) for s in ds.sequences] == [4, 3, 3, 4]
    assert ds.user_raw_ids == ["42", "alice@example.com", "bob", "user with spaces"]


def test_temporal_split_with_cutoffs(tmp_path: Path) -> None:
    ds = load_generic(
        SHOP / "items.csv",
        SHOP / "interactions.csv",
        min_interactions=3,
        split="temporal",
        valid_start="2024-05-01",
        test_start="2024-05-20",
    )
    t = ds.meta["temporal"]
    assert t["valid_start"].startswith("2024-05-01") and t["test_start"].startswith("2024-05-20")
    check_split(ds)
    seq_times = {}  # every test target is at/after the cutoff, every train item before valid_start
    raw = {it.item_id: it.raw_id for it in ds.items}
    with open(SHOP / "interactions.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            seq_times.setdefault((r["user_id"], r["item_id"]), r["timestamp"])
    for e in ds.test:
        assert seq_times[(ds.user_raw_ids[e.user_id], raw[e.target])] >= "2024-05-20"
        assert ds.train[e.user_id] == ds.sequences[e.user_id][: len(ds.train[e.user_id])]
    for u, train in enumerate(ds.train):
        assert all(seq_times[(ds.user_raw_ids[u], raw[i])] < "2024-05-01" for i in train)
    default = load_generic(
        SHOP / "items.csv", SHOP / "interactions.csv", min_interactions=3, split="temporal"
    )
    assert default.meta["temporal"]["valid_start"] < default.meta["temporal"]["test_start"]
    assert len(default.test) > 0


def test_users_left_short_are_counted_not_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items, inters = small_shop()
    inters.append(
        {"user_id": "newbie", "item_id": "007", "timestamp": "2024-01-01", "event": "", "rating": ""}
    )
    inters.append(
        {"user_id": "newbie", "item_id": "sku 1", "timestamp": "2024-01-02", "event": "", "rating": ""}
    )
    args = (write_items(tmp_path / "i.csv", items), write_inters(tmp_path / "e.csv", inters))
    with caplog.at_level(logging.WARNING):
        ds = load_generic(*args, min_interactions=1)
    assert ds.meta["filtering"]["users_dropped_short"] == 1
    assert "newbie" not in ds.user_raw_ids
    assert any("dropped 1 user(s) with fewer than 3 interactions" in r.message for r in caplog.records)
    out = tmp_path / "out"
    prepare(PrepareArgs(output_dir=str(out), embed=False), dataset=ds)
    assert read_json(out / "meta.json")["filtering"]["users_dropped_short"] == 1


# --- validation errors: file, line and column ------------------------------------------------


def prepare_generic(tmp: Path, items: Path, inters: Path, **kw) -> PrepareArgs:
    return PrepareArgs(
        format="generic",
        item_path=str(items),
        inter_path=str(inters),
        output_dir=str(tmp / "out" / "ds"),
        embed=False,
        **kw,
    )


def expect_error(args: PrepareArgs, pattern: str) -> None:
    with pytest.raises(DataError) as info:
        prepare(args)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert not Path(args.output_dir).exists()


def test_missing_required_item_column(tmp_path: Path) -> None:
    items, inters = small_shop()
    i = write_items(tmp_path / "items.csv", items, ["item_id", "description"])
    e = write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e),
        r"items\.csv:1 field 'title': missing required column\(s\) "
        r"\['title'\]; the columns are \['item_id', 'description'\]",
    )


def test_missing_required_interaction_column(tmp_path: Path) -> None:
    items, inters = small_shop()
    i = write_items(tmp_path / "items.csv", items)
    e = write_inters(tmp_path / "inter.csv", inters, ("user_id", "item_id"))
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.csv:1 field 'timestamp': missing required column")
    e = write_inters(tmp_path / "inter.jsonl", [{"user_id": "u", "item_id": "007"}])
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.jsonl:1 field 'timestamp': missing required field")


def test_unknown_item_in_interactions(tmp_path: Path) -> None:
    items, inters = small_shop()
    inters[5]["item_id"] = "no-such-sku"
    i, e = write_items(tmp_path / "items.csv", items), write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e),
        r"inter\.csv:7 field 'item_id': unknown item id 'no-such-sku': not in the items file .*items\.csv",
    )


def test_duplicate_item_id(tmp_path: Path) -> None:
    items, inters = small_shop()
    items.append(dict(items[1]))
    i, e = write_items(tmp_path / "items.csv", items), write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e),
        r"items\.csv:7 \[key 'Ünïcode-2'\] field 'item_id': duplicate item id \(first on line 3\)",
    )


def test_item_without_title(tmp_path: Path) -> None:
    items, inters = small_shop()
    items[3]["title"] = "   "
    i, e = write_items(tmp_path / "items.csv", items), write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e), r"items\.csv:5 \[key 'a/b:c'\] field 'title': item has no title"
    )


@pytest.mark.parametrize("stamp", ["yesterday", "2024-13-45", "12/03/2024 10:00", "-5"])
def test_unparsable_timestamp(tmp_path: Path, stamp: str) -> None:
    items, inters = small_shop()
    inters[2]["timestamp"] = stamp
    i, e = write_items(tmp_path / "items.csv", items), write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e),
        r"inter\.csv:4 field 'timestamp': (unparsable timestamp|"
        r"timestamp '-5' is not a valid epoch time)",
    )


def test_wrong_types_in_jsonl(tmp_path: Path) -> None:
    items, inters = small_shop()
    i = write_items(tmp_path / "items.jsonl", items)
    for field, value, pattern in [
        ("item_id", ["007"], r"field 'item_id': id \['007'\] has type list"),
        ("user_id", None, r"field 'user_id': id None has type NoneType"),
        ("timestamp", True, r"field 'timestamp': timestamp True"),
        ("rating", "five", r"field 'rating': rating 'five' is not a number"),
    ]:
        rows = [dict(r) for r in inters]
        rows[3][field] = value
        e = write_items(tmp_path / "inter.jsonl", rows)
        expect_error(prepare_generic(tmp_path, i, e), r"inter\.jsonl:4 " + pattern)
    bad_items = [dict(r) for r in items]
    bad_items[0]["description"] = {"text": "nested"}
    expect_error(
        prepare_generic(tmp_path, write_items(tmp_path / "items.jsonl", bad_items), e),
        r"items\.jsonl:1 \[key 'sku 1'\] field 'description': expected text or a list of strings, got dict",
    )


def test_malformed_jsonl_and_csv(tmp_path: Path) -> None:
    items, inters = small_shop()
    i = write_items(tmp_path / "items.csv", items)
    e = tmp_path / "inter.jsonl"
    e.write_text(json.dumps(inters[0]) + "\n" + '{"user_id": "u", "item_id": \n')
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.jsonl:2: malformed JSON")
    e = tmp_path / "inter.csv"
    e.write_text("user_id,item_id,timestamp\nu,007,1700000000\nu,007,1700000001,extra,fields\n")
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.csv:3: row has more fields than the 3 columns")
    e.write_text("")
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.csv:1: empty file")
    e = tmp_path / "inter.xlsx"
    e.write_text("x")
    expect_error(prepare_generic(tmp_path, i, e), r"inter\.xlsx: unknown file type 'xlsx'")


def test_empty_result_after_kcore(tmp_path: Path) -> None:
    items, inters = small_shop()
    i, e = write_items(tmp_path / "items.csv", items), write_inters(tmp_path / "inter.csv", inters)
    expect_error(
        prepare_generic(tmp_path, i, e, min_interactions=10),
        r"inter\.csv field 'min_interactions': no interactions left after filtering: 16 read, 16 "
        r"removed by the 10-core",
    )
    expect_error(
        prepare_generic(tmp_path, i, e, min_interactions=1, start_time="2030-01-01"),
        r"no interactions left after filtering in \[2030-01-01, \+inf\)",
    )
