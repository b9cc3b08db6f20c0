"""Hardening of the data side (issue 15, items 1, 4 and 5): bad inputs found by trying new ones.

Each bad input is a DataError whose message names the file, the line or key, and the field; a
failed ``prepare`` leaves nothing partial behind and never touches its inputs. Output
directories are only replaced when they are an earlier output of the same stage, and staging
folders left by a killed run are removed by the next one.
"""

from __future__ import annotations

import csv
import fcntl
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.dataset import Item, RecDataset
from data_prep.embed import load_embeddings
from data_prep.io import (
    DataError,
    atomic_directory,
    check_output_dir,
    clean_stale_staging,
    iter_jsonl,
    read_json,
)
from data_prep.kcore import parse_time
from data_prep.loaders.amazon import load_amazon
from data_prep.loaders.generic import load_generic
from data_prep.loaders.lcrec import load_lcrec
from data_prep.prepare import PrepareArgs, prepare
from data_prep.text import clean_text, render_item_text
from sid_tokenizer.build import BuildArgs, build
from sid_tokenizer.quantizers import make_quantizer

ROOT = Path(__file__).resolve().parents[1]
SCIENTIFIC = ROOT / "data" / "scientific"

# --- helpers ---------------------------------------------------------------------------------


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) -> its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def shop() -> tuple[list[dict], list[dict]]:
    """4 items, 3 users with 4 events each, epoch-second timestamps."""
    items = [
        {"item_id": f"i{n}", "title": f"Thing {n}", "brand": "B", "categories": "Home"} for n in range(4)
    ]
    inters = [
        {
            "user_id": f"u{u}",
            "item_id": f"i{(u + k) % 4}",
            "timestamp": str(1_700_000_000 + 1000 * u + 86400 * k),
        }
        for u in range(3)
        for k in range(4)
    ]
    return items, inters


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shop_files(tmp: Path, items_name: str = "items.csv", inter_name: str = "inter.csv") -> tuple[Path, Path]:
    inputs = tmp / "in"
    inputs.mkdir(exist_ok=True)
    items, inters = shop()
    write = {".csv": write_csv, ".jsonl": write_jsonl}
    return (
        write[Path(items_name).suffix](inputs / items_name, items),
        write[Path(inter_name).suffix](inputs / inter_name, inters),
    )


def generic_args(tmp: Path, items: Path, inters: Path, **kw) -> PrepareArgs:
    return PrepareArgs(
        format="generic",
        item_path=str(items),
        inter_path=str(inters),
        output_dir=str(tmp / "out" / "dataset"),
        min_interactions=1,
        embed=False,
        **kw,
    )


def expect_failure(args: PrepareArgs, *parts: str) -> DataError:
    """``prepare(args)`` raises a DataError naming every part; output and inputs are as before."""
    out = Path(args.output_dir)
    inputs = [Path(p) for p in (args.item_path, args.inter_path) if p]
    before_inputs = {str(p): snapshot(p) for p in inputs}
    before_out = snapshot(out) if out.exists() else None
    siblings = sorted(out.parent.iterdir()) if out.parent.exists() else []
    with pytest.raises(DataError) as info:
        prepare(args)
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert {str(p): snapshot(p) for p in inputs} == before_inputs, "an input was changed"
    assert (snapshot(out) if out.exists() else None) == before_out, "the output was changed"
    if out.parent.exists():
        assert sorted(out.parent.iterdir()) == siblings, "staging folders left behind"
    return info.value


# --- 1. output directories -------------------------------------------------------------------


def test_prepare_refuses_the_folder_holding_its_inputs(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    args = generic_args(tmp_path, items, inters)
    args.output_dir = str(items.parent)  # the folder with items.csv and inter.csv
    expect_failure(args, str(items.parent), "field 'output_dir'", "is or contains the input")
    args.output_dir = str(tmp_path)  # a folder above the inputs
    expect_failure(args, "is or contains the input")


def test_prepare_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    args = generic_args(tmp_path, items, inters)
    out = Path(args.output_dir)
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    expect_failure(args, str(out), "field 'output_dir'", "not a data_prep.prepare output", "notes.txt")
    (out / "meta.json").write_text(json.dumps({"stage": "sid_tokenizer.build"}))  # another stage's output
    expect_failure(args, "is a sid_tokenizer.build output, not a data_prep.prepare output")
    (out / "meta.json").unlink()
    (out / "notes.txt").unlink()
    (out.parent / "file").write_text("x")
    args.output_dir = str(out.parent / "file")
    expect_failure(args, "exists and is not a directory")


def test_prepare_replaces_an_empty_folder_and_its_own_output(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    args = generic_args(tmp_path, items, inters)
    out = Path(args.output_dir)
    out.mkdir(parents=True)  # empty: nothing to lose
    prepare(args)
    meta = read_json(out / "meta.json")
    assert meta["stage"] == "data_prep.prepare" and meta["counts"]["users"] == 3
    prepare(args)  # a rerun replaces the earlier dataset
    del meta["stage"]  # a dataset directory written before meta.json had "stage"
    (out / "meta.json").write_text(json.dumps(meta))
    prepare(args)
    assert read_json(out / "meta.json")["stage"] == "data_prep.prepare"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset"]


def test_check_output_dir_is_shared_by_any_stage(tmp_path: Path) -> None:
    out = tmp_path / "sid"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"stage": "sid_tokenizer.build"}))
    check_output_dir(out, "sid_tokenizer.build")  # its own earlier output: fine
    with pytest.raises(
        DataError, match=r"sid field 'output_dir': exists and is a sid_tokenizer.build output"
    ):
        check_output_dir(out, "data_prep.prepare")
    (out / "index.json").write_text("{}")
    with pytest.raises(DataError, match="is or contains the input"):
        check_output_dir(out, "sid_tokenizer.build", inputs=[out / "index.json"])
    with pytest.raises(DataError, match="is or contains the input"):
        with atomic_directory(out, stage="sid_tokenizer.build", inputs=[out / "index.json"]):
            raise AssertionError("not reached")
    assert (out / "index.json").read_text() == "{}"


# --- 5. staging folders of killed runs -------------------------------------------------------


def test_stale_staging_folders_are_removed_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    stale = [tmp_path / ".dataset.99999.abcdefgh.tmp", tmp_path / ".dataset.k2j4h5g6.tmp"]  # new + old names
    for d in stale:
        d.mkdir()
        (d / "items.jsonl").write_text('{"item_id": 0')
    live = tmp_path / ".dataset.12345.zzzzzzzz.tmp"
    live.mkdir()
    holder = subprocess.Popen(  # another process still writing there: it holds the folder's lock
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(live),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = tmp_path / ".datasets.1.abcdefgh.tmp"  # another output's staging folder
        other.mkdir()
        backup = tmp_path / ".dataset.my-backup.old"  # a user's folder, not a name atomic_directory makes
        backup.mkdir()
        with atomic_directory(out) as tmp:
            (tmp / "x").write_text("1")
        assert not any(d.exists() for d in stale)
        assert live.exists() and other.exists() and backup.exists() and (out / "x").read_text() == "1"
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale_staging(out) == [live]  # its writer is gone now


def test_output_moved_aside_by_a_killed_run_is_restored(tmp_path: Path) -> None:
    """Killed between moving the old output aside and moving the new one in: the old one comes back."""
    out = tmp_path / "dataset"
    old = tmp_path / ".dataset.4242.old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"stage": "data_prep.prepare"}))
    assert clean_stale_staging(out) == [] and not old.exists()
    assert read_json(out / "meta.json") == {"stage": "data_prep.prepare"}


def test_prepare_killed_with_sigkill_then_rerun_leaves_no_staging(tmp_path: Path) -> None:
    """kill -9 while prepare's staging folder exists (it is embedding item text), then rerun."""
    out = tmp_path / "out" / "dataset"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.prepare",
        "--config",
        "data_prep/configs/example_own_data.yaml",  # the vendored shop: no shipped embeddings, so
        "--output_dir",  # the encoder runs (the slow step) with the staging folder in place
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging: list[Path] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            staging = list(out.parent.glob(".dataset.*.tmp")) if out.parent.exists() else []
            if staging and (staging[0] / "meta.json").exists():
                break
            time.sleep(0.02)
        assert staging, "prepare never staged its output"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert all(p.exists() for p in staging) and not out.exists()  # what kill -9 leaves
    shop_dir = ROOT / "data" / "example_shop"
    rerun = PrepareArgs(
        format="generic",
        item_path=str(shop_dir / "items.csv"),
        inter_path=str(shop_dir / "interactions.csv"),
        min_interactions=3,
        output_dir=str(out),
        embed=False,
    )
    prepare(rerun)
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset"]
    assert read_json(out / "meta.json")["counts"]["items"] == 35


# --- 4. bad inputs: decoding, compression, bytes ---------------------------------------------


def test_truncated_gzip_names_file_and_line(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    data = gzip.compress(inters.read_bytes())
    gz = inters.with_name("inter.csv.gz")
    gz.write_bytes(data[: len(data) // 2])  # cut mid-stream, as an interrupted download
    expect_failure(generic_args(tmp_path, items, gz), "inter.csv.gz:", "corrupt or truncated gzip file")
    reviews = tmp_path / "in" / "reviews_X_5.json.gz"
    reviews.write_bytes(gzip.compress(b'{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n' * 500)[:60])
    meta = tmp_path / "in" / "meta_X.json.gz"
    meta.write_bytes(gzip.compress(b"{'asin': 'B', 'title': 't'}\n"))
    with pytest.raises(DataError, match=r"reviews_X_5\.json\.gz:\d+: corrupt or truncated gzip"):
        load_amazon(reviews, meta)


def test_gzip_content_without_gz_name_is_read(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    inters.write_bytes(gzip.compress(inters.read_bytes()))  # compressed, but named .csv
    assert load_generic(items, inters, min_interactions=1).num_interactions == 12


def test_non_utf8_names_the_right_line_and_column(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    lines = items.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"Thing 2", b"Th\xe9ing 2")  # latin-1 e-acute on line 4
    items.write_bytes(b"\n".join(lines))
    expect_failure(
        generic_args(tmp_path, items, inters), "items.csv:4:", "not UTF-8 text: byte 0xe9 at column"
    )
    inter_json = tmp_path / "in" / "X.inter.json"
    inter_json.write_bytes(b'{\n "u1": ["a", "b", "c"],\n "u2": ["\xff", "b", "c"]\n}\n')
    with pytest.raises(DataError, match=r"X\.inter\.json:3: not UTF-8 text: byte 0xff at column 10"):
        load_lcrec(inter_json)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"item_id,title\ni0,Thing\x000\n", "items.csv:2: NUL byte at column 9"),
        ("item_id,title\ni0,Thing 0\n".encode("utf-16"), "items.csv:1: the file is UTF-16 LE text"),
    ],
)
def test_nul_bytes_and_utf16_files(tmp_path: Path, content: bytes, expected: str) -> None:
    items, inters = shop_files(tmp_path)
    items.write_bytes(content)
    expect_failure(generic_args(tmp_path, items, inters), expected)


def test_bom_crlf_and_bare_cr_line_endings_read_the_same(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    ref = load_generic(items, inters, min_interactions=1)
    for ending in (b"\r\n", b"\r"):
        for path in (items, inters):
            path.write_bytes(
                b"\xef\xbb\xbf" + path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", ending)
            )
        ds = load_generic(items, inters, min_interactions=1)
        assert ds.sequences == ref.sequences and ds.items == ref.items, ending
        for path in (items, inters):
            path.write_bytes(path.read_bytes()[3:].replace(ending, b"\n"))
    bom_json = tmp_path / "in" / "X.inter.json"
    bom_json.write_bytes(b'\xef\xbb\xbf{"u1": ["a", "b", "c"]}')
    assert load_lcrec(bom_json).sequences == [[0, 1, 2]]


def test_empty_files(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path, inter_name="inter.jsonl")
    inters.write_text("")
    expect_failure(generic_args(tmp_path, items, inters), "inter.jsonl", "no interactions")
    empty_json = tmp_path / "in" / "X.inter.json"
    empty_json.write_text("  \n")
    with pytest.raises(DataError, match=r"X\.inter\.json:1: empty file"):
        load_lcrec(empty_json)
    with pytest.raises(DataError, match="is a directory, expected a file"):
        list(iter_jsonl(tmp_path))


# --- 4. bad inputs: structure ----------------------------------------------------------------


def test_duplicated_csv_column(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    items.write_text("item_id,title,brand,title\ni0,Thing 0,B,Other title\n")
    expect_failure(
        generic_args(tmp_path, items, inters),
        "items.csv:1 field 'title'",
        "column 'title' appears twice in the header (columns 2 and 4)",
    )


def test_unnamed_csv_columns(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    ref = load_generic(items, inters, min_interactions=1)
    items.write_text(items.read_text().replace("\n", ",\n"))  # a trailing comma on every line
    assert load_generic(items, inters, min_interactions=1).items == ref.items
    lines = items.read_text().split("\n")
    lines[2] = lines[2] + "stray"
    items.write_text("\n".join(lines))
    expect_failure(generic_args(tmp_path, items, inters), "items.csv:3:", "which has no name in the header")


def test_json_keys_repeated_with_different_values(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path, inter_name="inter.jsonl")
    rows = inters.read_text().splitlines()
    rows[4] = rows[4][:-1] + ', "item_id": "i3"}'  # the same key again, another value: which one?
    rows[5] = rows[5][:-1] + ', "user_id": "u1"}'  # the same key again, the same value: harmless
    inters.write_text("\n".join(rows) + "\n")
    expect_failure(generic_args(tmp_path, items, inters), "inter.jsonl:5 [key 'item_id']", "different values")


def test_deeply_nested_json_and_nested_ids(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path, inter_name="inter.jsonl")
    rows = inters.read_text().splitlines()
    rows[1] = '{"user_id": ' + "[" * 100000 + "]" * 100000 + "}"
    inters.write_text("\n".join(rows) + "\n")
    expect_failure(generic_args(tmp_path, items, inters), "inter.jsonl:2", "nested too deeply")
    rows[1] = '{"user_id": [["u1"]], "item_id": "i1", "timestamp": 1700000000}'
    inters.write_text("\n".join(rows) + "\n")
    expect_failure(generic_args(tmp_path, items, inters), "inter.jsonl:2 field 'user_id'", "has type list")


# --- 4. bad inputs: field values -------------------------------------------------------------


def test_microsecond_nanosecond_and_mixed_unit_timestamps_are_read_correctly(tmp_path: Path) -> None:
    s = 1_700_000_000
    assert (
        parse_time(s, "f")
        == parse_time(s * 1000, "f")
        == parse_time(s * 10**6, "f")
        == parse_time(s * 10**9, "f")
    )
    items, inters = shop_files(tmp_path)
    ref = load_generic(items, inters, min_interactions=1)
    rows = list(csv.DictReader(inters.open()))
    for k, r in enumerate(rows):  # every row in another unit
        r["timestamp"] = str(int(r["timestamp"]) * 10 ** (3 * (k % 4)))
    write_csv(inters, rows)
    ds = load_generic(items, inters, min_interactions=1)
    assert ds.sequences == ref.sequences
    assert ds.meta["filtering"]["time_range"] == ref.meta["filtering"]["time_range"]


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("9999-12-31", "is outside 1970-01-01..2100-01-01"),
        ("253402300799", "no plausible epoch time (9999-12-31 as seconds, 1978-01-11 as milliseconds"),
        ("1969-07-20", "is outside 1970-01-01..2100-01-01"),
        ("-86400", "is not a valid epoch time"),
        ("5000000000", "2128-06-11 as seconds"),
        ("nan", "is not a valid epoch time"),
    ],
)
def test_implausible_timestamps(tmp_path: Path, stamp: str, expected: str) -> None:
    items, inters = shop_files(tmp_path)
    rows = list(csv.DictReader(inters.open()))
    rows[6]["timestamp"] = stamp
    write_csv(inters, rows)
    expect_failure(generic_args(tmp_path, items, inters), "inter.csv:8 field 'timestamp'", expected)


@pytest.mark.parametrize("rating", ["nan", "NaN", "inf", "-Infinity"])
def test_nan_and_inf_ratings_do_not_pass_min_rating(tmp_path: Path, rating: str) -> None:
    items, inters = shop_files(tmp_path)
    rows = list(csv.DictReader(inters.open()))
    for r in rows:
        r["rating"] = "5"
    rows[2]["rating"] = rating
    write_csv(inters, rows)
    expect_failure(
        generic_args(tmp_path, items, inters, min_rating=4.0),
        "inter.csv:4 field 'rating'",
        "not a finite number",
    )
    jsonl = tmp_path / "in" / "inter.jsonl"
    jsonl.write_text("".join(json.dumps(r).replace(f'"{rating}"', "NaN") + "\n" for r in rows))
    expect_failure(
        generic_args(tmp_path, items, jsonl, min_rating=4.0), "inter.jsonl:3:", "NaN is not valid JSON"
    )


def test_angle_brackets_in_titles_survive_cleaning() -> None:
    assert clean_text("Screws <M3> pack, 5 < 6 > 4") == "Screws <M3> pack, 5 < 6 > 4"
    assert clean_text("Rise Time: <=14ns* Respond: >=5Hz") == "Rise Time: <=14ns* Respond: >=5Hz"
    assert clean_text("Line<br>break <p class='x'>para</p><!-- c --> <B>bold</B>") == "Line break para bold"
    assert clean_text("&lt;script&gt;alert(1)&lt;/script&gt;Safe") == "Safe"
    assert clean_text("<ulu>Pipette, reusable.</ulu>") == "Pipette, reusable."  # a closed tag is markup
    # SID-shaped text would tokenize into SID tokens: it is rewritten, not deleted
    assert clean_text("Kit <a_12><b_3> v2") == "Kit [a_12][b_3] v2"


def test_scientific_description_with_angle_brackets_keeps_its_text() -> None:
    ds = load_lcrec(SCIENTIFIC / "Scientific.inter.json", SCIENTIFIC / "Scientific.item.json")
    owon = next(it for it in ds.items if it.title.startswith("Owon VDS1022I"))
    assert "Rise Time: <=14ns* Record Length: 5K" in owon.description  # was cut from "<" to ">"


def test_title_given_as_a_json_object(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path, items_name="items.jsonl")
    rows = [json.loads(x) for x in items.read_text().splitlines()]
    rows[1]["title"] = {"en": "Thing 1", "de": "Ding 1"}
    write_jsonl(items, rows)
    expect_failure(
        generic_args(tmp_path, items, inters), "items.jsonl:2 [key 'i1'] field 'title'", "got dict"
    )
    rows[1]["title"] = ["Thing 1", {"en": "x"}]  # a list with an object inside
    write_jsonl(items, rows)
    expect_failure(
        generic_args(tmp_path, items, inters), "items.jsonl:2 [key 'i1'] field 'title'", "got dict"
    )
    rows[1]["title"], rows[1]["specs"] = "Thing 1", {"w": 3}  # an extra column holding an object
    write_jsonl(items, rows)
    expect_failure(generic_args(tmp_path, items, inters), "items.jsonl:2 [key 'i1'] field 'specs'", "flatten")
    item_json = tmp_path / "in" / "X.item.json"
    item_json.write_text(json.dumps({"a": {"title": "A"}, "b": {"title": {"en": "B"}}}))
    inter_json = tmp_path / "in" / "X.inter.json"
    inter_json.write_text(json.dumps({"u": ["a", "b", "a"]}))
    with pytest.raises(DataError, match=r"X\.item\.json \[key 'b'\] field 'title': expected text.*got dict"):
        load_lcrec(inter_json, item_json)
    item_json.write_text(json.dumps({"a": {"title": "A", "categories": {"x": 1}}, "b": {"title": "B"}}))
    with pytest.raises(DataError, match=r"X\.item\.json \[key 'a'\] field 'categories'"):
        load_lcrec(inter_json, item_json)


def test_amazon_metadata_with_object_title(tmp_path: Path) -> None:
    reviews = tmp_path / "X.json.gz"
    reviews.write_bytes(gzip.compress(b'{"reviewerID": "A", "asin": "B1", "unixReviewTime": 1400000000}\n'))
    meta = tmp_path / "meta_X.json.gz"
    meta.write_bytes(gzip.compress(b'{"asin": "B1", "title": {"text": "t"}, "category": ["x"]}\n'))
    with pytest.raises(DataError, match=r"meta_X\.json\.gz:1 \[key 'B1'\] field 'title': expected text"):
        load_amazon(reviews, meta)


def test_text_template_must_be_plain_fields() -> None:
    item = Item(item_id=0, raw_id="a", title="A", extra={"specs": {"w": 3}})
    assert render_item_text(item, "{title}!") == "A!"
    for template, expected in [
        ("{0}", "not a plain"),
        ("{title.__class__}", "not a plain"),
        ("{title:>99}", "not a plain"),
        ("{nope}", "unknown field 'nope'"),
        ("{title", "expected '}'"),
    ]:
        with pytest.raises(ValueError, match=expected):
            render_item_text(item, template)


# --- 4. embeddings ---------------------------------------------------------------------------


def test_huge_finite_embeddings_are_refused_before_faiss(tmp_path: Path) -> None:
    emb = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    emb[5, 3] = 3e30  # finite, but its square overflows float32: faiss would abort the process
    path = tmp_path / "emb.npy"
    np.save(path, emb)
    with pytest.raises(DataError, match=r"emb\.npy: bad embedding matrix: row 5 column 3 is 3e\+30"):
        load_embeddings(path, num_items=16)
    with pytest.raises(ValueError, match="row 5 column 3 is 3e"):
        make_quantizer("rkmeans", num_levels=2, codebook_size=4).fit(emb)
    np.save(path, emb.astype(np.complex64))
    with pytest.raises(DataError, match="dtype complex64 is not a real number type"):
        load_embeddings(path, num_items=16)
    path.write_bytes(path.read_bytes()[:100])  # truncated file
    with pytest.raises(DataError, match="not a readable .npy array"):
        load_embeddings(path, num_items=16)


def test_dataset_dir_with_a_broken_row(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    args = generic_args(tmp_path, items, inters)
    prepare(args)
    out = Path(args.output_dir)
    text = (out / "valid.jsonl").read_text().splitlines()
    text[1] = '{"user_id": 1, "history": [0]}'
    (out / "valid.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"valid\.jsonl:2 field 'target': missing field"):
        RecDataset.load(out)


def test_flock_is_available() -> None:
    """The staging-folder locks use flock(2); fail loudly on a platform without it."""
    assert hasattr(fcntl, "flock")


# --- the SID stage ---------------------------------------------------------------------------


def tiny_dataset(tmp: Path) -> tuple[Path, Path]:
    """A prepared 4-item dataset directory and a (4, 8) embedding file for it."""
    items, inters = shop_files(tmp)
    args = generic_args(tmp, items, inters)
    prepare(args)
    emb = tmp / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32))
    return Path(args.output_dir), emb


def build_args(dataset_dir: Path, emb: Path, output_dir: Path, **kw) -> BuildArgs:
    return BuildArgs(
        dataset_dir=str(dataset_dir),
        embeddings_file=str(emb),
        output_dir=str(output_dir),
        num_levels=2,
        codebook_size=2,
        kmeans_niter=2,
        **kw,
    )


def test_build_refuses_the_dataset_dir_and_foreign_folders(tmp_path: Path) -> None:
    ds_dir, emb = tiny_dataset(tmp_path)
    before = snapshot(ds_dir)
    with pytest.raises(DataError, match=r"dataset field 'output_dir': is or contains the input"):
        build(build_args(ds_dir, emb, ds_dir))
    with pytest.raises(DataError, match="is or contains the input"):
        build(build_args(ds_dir, emb, tmp_path / "out"))  # the folder above the dataset
    assert snapshot(ds_dir) == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a sid_tokenizer.build output"):
        build(build_args(ds_dir, emb, notes))
    assert (notes / "todo.txt").read_text() == "keep me"
    sid = tmp_path / "sid"
    (tmp_path / ".sid.4242.abcdefgh.tmp" / "quantizer").mkdir(parents=True)  # a killed build's staging
    build(build_args(ds_dir, emb, sid))
    build(build_args(ds_dir, emb, sid, seed=1))  # its own earlier output: replaced
    assert read_json(sid / "meta.json")["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_build_refuses_huge_embeddings_instead_of_aborting(tmp_path: Path) -> None:
    ds_dir, emb = tiny_dataset(tmp_path)
    x = np.load(emb)
    x[2, 1] = -7e25
    np.save(emb, x)
    with pytest.raises(DataError, match=r"emb\.npy: bad embedding matrix: row 2 column 1 is -7e\+25"):
        build(build_args(ds_dir, emb, tmp_path / "sid"))
    assert not (tmp_path / "sid").exists()


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (["<a_99999999999>", "<b_1>"], "code 99999999999 is not below the codebook cap 65536"),
        (["<a_" + "9" * 400 + ">", "<b_1>"], "code 999999999999... is not below the codebook cap"),
        ([f"<{chr(97 + lv % 26)}_1>" for lv in range(27)], "SID has 27 tokens, at most 26 levels"),
        (["<a_1>", 7], "token 2 is 7, expected <b_N>"),
    ],
)
def test_imported_index_with_absurd_codes(tmp_path: Path, entry: list, expected: str) -> None:
    ds_dir, emb = tiny_dataset(tmp_path)
    raw_ids = [it.raw_id for it in RecDataset.load(ds_dir).items]
    index = tmp_path / "in" / "X.index.json"
    index.write_text(
        json.dumps({r: ["<a_1>", f"<b_{k}>"] for k, r in enumerate(raw_ids)} | {raw_ids[1]: entry})
    )
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        build(build_args(ds_dir, emb, tmp_path / "sid", index_path=str(index)))
    assert time.perf_counter() - started < 5  # no vocabulary of 10^11 tokens is ever built
    assert "X.index.json" in str(info.value) and f"key {raw_ids[1]!r}" in str(info.value)
    assert expected in str(info.value)
    index.write_text(json.dumps({r: ["<a_1>", f"<b_{k}>"] for k, r in enumerate(raw_ids)}))
    with pytest.raises(DataError, match=r"level_sizes: codebook size 1000000 at level 'a'"):
        build(build_args(ds_dir, emb, tmp_path / "sid", index_path=str(index), level_sizes=[10**6, 8]))
    assert not (tmp_path / "sid").exists()
    with pytest.raises(ValueError, match="codebook_size must be <= 65536"):
        make_quantizer("rkmeans", codebook_size=10**6)


def test_minionerec_csv_with_a_duplicated_column(tmp_path: Path) -> None:
    from tests.test_bad_input import COLUMNS, _row, mini_files

    args = mini_files(tmp_path)
    rows = [_row("A1", [0, 1, 2], 3)]
    with open(args.test_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*COLUMNS, "item_id"])
        w.writerows([[r[c] for c in COLUMNS] + ["5"] for r in rows])
    with pytest.raises(DataError, match=r"test\.csv:1 field 'item_id': column 'item_id' appears twice"):
        prepare(args)


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    before = snapshot(items.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", "--format", "generic", "--item_path", str(items),
         "--inter_path", str(inters), "--output_dir", str(items.parent), "--embed", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "field 'output_dir': is or contains the input" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(items.parent) == before


def test_guide_shows_the_messages_prepare_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/own_data.md lists the messages for broken copies of the example shop: they are real."""
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    good_items = (ROOT / "data" / "example_shop" / "items.csv").read_bytes()
    good_inter = (ROOT / "data" / "example_shop" / "interactions.csv").read_bytes()
    messages = []

    def run(
        items: str = "bad/items.csv", inter: str = "bad/interactions.csv", out: str = "o/ds", **kw
    ) -> None:
        args = PrepareArgs(
            format="generic",
            item_path=items,
            inter_path=inter,
            output_dir=out,
            embed=False,
            min_interactions=3,
            **kw,
        )
        with pytest.raises(DataError) as info:
            prepare(args)
        messages.append(str(info.value))
        (bad / "items.csv").write_bytes(good_items)
        (bad / "interactions.csv").write_bytes(good_inter)

    (bad / "items.csv").write_bytes(good_items)
    (bad / "interactions.csv").write_bytes(good_inter)
    lines = good_items.split(b"\n")
    lines[6] = lines[6].replace(b"e", b"\xe9", 1)
    (bad / "items.csv").write_bytes(b"\n".join(lines))
    run()
    (bad / "items.csv").write_bytes(good_items.replace(b"item_id,title,", b"item_id,title,title,", 1))
    run()
    data = gzip.compress(good_inter)
    (bad / "interactions.csv.gz").write_bytes(data[: len(data) // 2])
    run(inter="bad/interactions.csv.gz")
    rows = list(csv.DictReader(io.StringIO(good_inter.decode())))
    rows[4]["timestamp"] = "9999-12-31"
    write_csv(bad / "interactions.csv", rows)
    run()
    items = list(csv.DictReader(io.StringIO(good_items.decode())))
    items[2]["title"] = {"en": items[2]["title"]}
    write_jsonl(bad / "items.jsonl", items)
    run(items="bad/items.jsonl")
    rows = list(csv.DictReader(io.StringIO(good_inter.decode())))
    write_csv(
        bad / "interactions.csv", [{**r, "rating": "nan" if k == 5 else "5"} for k, r in enumerate(rows)]
    )
    run(min_rating=4)
    run(out="bad")
    guide = (ROOT / "docs" / "own_data.md").read_text()
    for msg in messages:
        assert msg in guide, msg


def test_unicode_digit_ids_and_amazon_2023_seconds(tmp_path: Path) -> None:
    inter_json = tmp_path / "X.inter.json"
    inter_json.write_text(json.dumps({"u": ["²", "1", "2"], "v": ["1", "2", "²"]}))  # "²".isdigit() is True
    assert [it.raw_id for it in load_lcrec(inter_json).items] == ["1", "2", "²"]
    rows = [
        {"user_id": f"U{u}", "parent_asin": f"B{(u + k) % 5}", "timestamp": (1_600_000_000 + 86400 * k) * s}
        for u in range(5)
        for k in range(5)
        for s in [1000 if u % 2 else 1]  # some users in ms (the documented unit), some in seconds
    ]
    reviews = write_jsonl(tmp_path / "X.jsonl", rows)
    meta = write_jsonl(
        tmp_path / "meta_X.jsonl", [{"parent_asin": f"B{n}", "title": f"T{n}"} for n in range(5)]
    )
    ds = load_amazon(reviews, meta)
    assert ds.meta["filtering"]["time_range"] == ["2020-09-13T12:26:40+00:00", "2020-09-17T12:26:40+00:00"]


def test_sid_strings_with_absurd_codes() -> None:
    from sid_tokenizer.sid import SidFormatError, SidVocab

    vocab = SidVocab((256, 256))
    huge = "<a_" + "9" * 5000 + ">"  # int() of > 4300 digits raises a ValueError of its own
    assert vocab.find_all(f"x <a_1><b_2> {huge}<b_1> <a_3><b_4>") == [(1, 2), (3, 4)]
    with pytest.raises(SidFormatError, match="exceeds codebook size 256"):
        vocab.parse(huge + "<b_1>")
    with pytest.raises(SidFormatError, match="codebook size 100000000000 at level 'a'"):
        SidVocab((10**11, 4))


def test_time_window_options_may_lie_outside_the_data_range(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    ds = load_generic(items, inters, min_interactions=1, start_time="1900-01-01", end_time="9999-12-31")
    assert ds.num_interactions == 12 and ds.meta["filtering"]["outside_time_window"] == 0


def test_header_case_and_separator_hints(tmp_path: Path) -> None:
    items, inters = shop_files(tmp_path)
    items.write_text(items.read_text().replace("item_id,title", "Item_ID,Title", 1))
    expect_failure(
        generic_args(tmp_path, items, inters), "items.csv:1 field 'item_id'", "rename 'Item_ID' for 'item_id'"
    )
    items.write_text("item_id;title\ni0;Thing 0\n")
    expect_failure(generic_args(tmp_path, items, inters), "items.csv:1", "separated by ';'")


def test_build_with_a_codebook_larger_than_the_catalogue(tmp_path: Path) -> None:
    ds_dir, emb = tiny_dataset(tmp_path)
    with pytest.raises(
        DataError, match=r"emb\.npy field 'codebook_size': 4 items is fewer than codebook_size 8"
    ):
        build(BuildArgs(**{**vars(build_args(ds_dir, emb, tmp_path / "sid")), "codebook_size": 8}))
