"""Data preparation on the real data: vendored Scientific, Beauty, MiniOneRec; raw Amazon dumps."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.dataset import Example, RecDataset
from data_prep.io import read_json
from data_prep.kcore import FilterOptions, Interaction, check_split, kcore
from data_prep.loaders.amazon import amazon_urls, category_name, load_amazon
from data_prep.loaders.lcrec import load_lcrec
from data_prep.loaders.minionerec import load_minionerec
from data_prep.prepare import LOADERS, PrepareArgs, prepare
from sid_tokenizer.sid import SidIndex

ROOT = Path(__file__).resolve().parents[1]
SCIENTIFIC = ROOT / "data" / "scientific"
SHARED = ROOT.parent / "shared" / "datasets"
BEAUTY = SHARED / "amazon14-beauty"
MINI = SHARED / "minionerec-industrial"
MINI_CSV = "Industrial_and_Scientific_5_2016-10-2018-11.csv"

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared datasets not available")


@pytest.fixture(scope="module")
def scientific() -> RecDataset:
    return load_lcrec(SCIENTIFIC / "Scientific.inter.json", SCIENTIFIC / "Scientific.item.json")


def test_scientific_counts(scientific: RecDataset) -> None:
    assert (scientific.num_users, scientific.num_items, scientific.num_interactions) == (8317, 4344, 58492)
    assert all(it.title for it in scientific.items)


def test_scientific_leave_one_out_has_no_leakage(scientific: RecDataset) -> None:
    valid = {e.user_id: e for e in scientific.valid}
    test = {e.user_id: e for e in scientific.test}
    assert len(valid) == len(test) == len(scientific.train) == scientific.num_users
    for u, seq in enumerate(scientific.sequences):
        assert scientific.train[u] == seq[:-2]
        assert valid[u] == Example(u, seq[:-2], seq[-2])
        assert test[u] == Example(u, seq[:-1], seq[-1])
        # the targets' positions are not in training (items may repeat, positions may not)
        assert len(scientific.train[u]) == len(seq) - 2


def test_dataset_dir_roundtrip(scientific: RecDataset, tmp_path: Path) -> None:
    out = scientific.save(tmp_path / "ds", extra_meta={"note": "roundtrip"})
    back = RecDataset.load(out)
    assert back.items == scientific.items
    assert back.sequences == scientific.sequences
    assert back.user_raw_ids == scientific.user_raw_ids
    assert (back.train, back.valid, back.test) == (scientific.train, scientific.valid, scientific.test)
    assert back.meta["note"] == "roundtrip" and back.meta["counts"]["interactions"] == 58492
    assert sorted(p.name for p in out.iterdir()) == [
        "items.jsonl",
        "meta.json",
        "sequences.jsonl",
        "test.jsonl",
        "train.jsonl",
        "valid.jsonl",
    ]


@pytest.mark.parametrize(
    "config", sorted((ROOT / "data_prep" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_parse(config: Path) -> None:
    from trl import TrlParser

    (args,) = TrlParser((PrepareArgs,)).parse_args_and_config(args=["--config", str(config)])
    assert args.format in LOADERS
    if args.format in ("amazon", "generic"):
        FilterOptions(
            args.min_interactions,
            args.start_time,
            args.end_time,
            args.split,
            args.valid_start,
            args.test_start,
        )
    for name in ("inter_path", "item_path", "valid_csv", "test_csv", "sid_index_path"):
        value = getattr(args, name)
        if value is None or value.startswith("raw/"):  # raw/: downloaded by the user first
            continue
        if value.startswith("../shared/") and not SHARED.exists():
            continue
        assert (ROOT / value).exists(), f"{config.name}: {name} {value} does not exist"


def test_prepare_cli_scientific(tmp_path: Path) -> None:
    out = tmp_path / "scientific"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.prepare",
        "--config",
        "data_prep/configs/scientific.yaml",
        "--output_dir",
        str(out),
        "--embed",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_json(out / "meta.json")
    assert meta["counts"]["users"] == 8317
    assert meta["counts"]["items"] == 4344
    assert meta["counts"]["interactions"] == 58492
    assert meta["split"] == "leave_one_out"
    assert not (out / "embeddings").exists()


@needs_shared
def test_beauty_interactions_only_with_third_party_index() -> None:
    ds = load_lcrec(BEAUTY / "Beauty.inter.json")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (22363, 12101, 198502)
    assert not any(it.title for it in ds.items)
    index = SidIndex.load(
        BEAUTY / "indexes" / "rkmeans_zcr" / "Beauty.index.json", raw_ids=[it.raw_id for it in ds.items]
    )
    assert len(index) == 12101
    assert index.vocab.num_levels == 4


# --- MiniOneRec -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minionerec() -> RecDataset:
    if not MINI.exists():
        pytest.skip("shared MiniOneRec data not available")
    return load_minionerec(
        MINI / "index" / "Industrial_and_Scientific.item.json",
        MINI / "valid" / MINI_CSV,
        MINI / "test" / MINI_CSV,
    )


def test_minionerec_reads_test_csv_and_index(minionerec: RecDataset) -> None:
    assert len(minionerec.test) == 4533
    assert len(minionerec.valid) == 4532
    assert minionerec.num_items == 3686
    with open(MINI / "test" / MINI_CSV, newline="") as fh:
        first = next(csv.DictReader(fh))
    e = minionerec.test[0]
    assert minionerec.user_raw_ids[e.user_id] == first["user_id"]
    assert [minionerec.items[i].raw_id for i in e.history] == [
        str(i) for i in json.loads(first["history_item_id"])
    ]
    assert minionerec.items[e.target].raw_id == first["item_id"]
    assert all(1 <= len(x.history) <= 10 for x in minionerec.test)
    assert minionerec.meta["valid_in_train"] is True and "split_note" in minionerec.meta


def test_minionerec_training_has_no_test_target(minionerec: RecDataset) -> None:
    check_split(minionerec)
    for e in minionerec.test:
        seq, train = minionerec.sequences[e.user_id], minionerec.train[e.user_id]
        assert seq[: len(train)] == train
        # the test target sits after the whole training sequence
        positions = [
            p
            for p in range(len(e.history), len(seq))
            if seq[p] == e.target and seq[p - len(e.history) : p] == e.history
        ]
        assert positions and positions[0] >= len(train)


def test_minionerec_prepare_keeps_their_sids(tmp_path: Path) -> None:
    if not MINI.exists():
        pytest.skip("shared MiniOneRec data not available")
    out = tmp_path / "mini"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.prepare",
        "--config",
        "data_prep/configs/minionerec_industrial.yaml",
        "--output_dir",
        str(out),
        "--embed",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_json(out / "meta.json")
    assert meta["sid_index"] == "sids/index.json"
    assert meta["counts"]["test_examples"] == 4533 and meta["counts"]["items"] == 3686
    ours = read_json(out / meta["sid_index"])
    theirs = read_json(MINI / "index" / "Industrial_and_Scientific.index.json")
    assert ours == theirs
    ds = RecDataset.load(out)
    index = SidIndex.load(out / "sids" / "index.json", raw_ids=[it.raw_id for it in ds.items])
    with open(MINI / "test" / MINI_CSV, newline="") as fh:
        row = next(csv.DictReader(fh))
    assert index.sid(ds.test[0].target) == row["item_sid"]


# --- raw Amazon dumps ------------------------------------------------------------------------

DAY = 86400
T0 = 1_500_000_000  # 2017-07-14
USERS = [f"U{i}" for i in range(6)]
ITEMS = [f"B00{i}" for i in range(5)]


def _reviews() -> list[tuple[str, str, int]]:
    """6 users x 5 items (a 5-core), plus the cases the loader must handle."""
    rows = [
        (u, it, T0 + (k * 5 + j) * DAY)
        for k, u in enumerate(USERS)
        for j, it in enumerate(ITEMS)
        if (u, it) not in (("U5", "B003"), ("U5", "B004"))
    ]
    rows += [("U0", "B000", T0 + 400 * DAY)]  # repeated (user, item): the first one is kept
    rows += [("SPARSE", "B001", T0 + 1), ("SPARSE", "B002", T0 + 2)]  # < 5 interactions: k-core drops
    rows += [(u, "NOTITLE", T0 + 300 * DAY) for u in USERS[:5]]  # item without a title: dropped, counted
    rows += [("U5", "B004", T0 + 500 * DAY), ("U5", "B003", T0 + 500 * DAY)]  # a tie keeps file order
    return rows


def _meta() -> list[dict]:
    out = [
        {
            "title": f"Gadget {i} &amp; case",
            "description": f"Useful gadget {i}",
            "brand": "Acme",
            "categories": ["Tools", f"Kind {i % 2}"],
            "asin": it,
        }
        for i, it in enumerate(ITEMS)
    ]
    return out + [{"asin": "NOTITLE", "title": "", "brand": "Acme"}]


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_amazon(tmp: Path, year: int) -> tuple[Path, Path]:
    reviews, meta = _reviews(), _meta()
    if year == 2014:
        r = [
            json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0, "helpful": [0, 0]})
            for u, i, t in reviews
        ]
        m = [
            repr(
                {
                    "asin": x["asin"],
                    "title": x["title"],
                    "description": x.get("description", ""),
                    "brand": x["brand"],
                    "categories": [x.get("categories", [])],
                    "salesRank": {"Tools": 1},
                }
            )
            for x in meta
        ]  # Python dict reprs, as in the 2014 dumps
        return _write_gz(tmp / "reviews_Tools_5.json.gz", r), _write_gz(tmp / "meta_Tools.json.gz", m)
    if year == 2018:
        r = [
            json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0, "vote": "2"})
            for u, i, t in reviews
        ]
        m = [
            json.dumps(
                {
                    "asin": x["asin"],
                    "title": x["title"],
                    "description": [x.get("description", "")],
                    "brand": x["brand"],
                    "category": x.get("categories", []),
                    "main_cat": "Tools",
                }
            )
            for x in meta
        ]
        m.append(m[0])  # the 2018 dumps repeat some lines
        return _write_gz(tmp / "Tools.json.gz", r), _write_gz(tmp / "meta_Tools.json.gz", m)
    r = [
        json.dumps({"user_id": u, "asin": i + "X", "parent_asin": i, "timestamp": t * 1000, "rating": 5.0})
        for u, i, t in reviews
    ]
    m = [
        json.dumps(
            {
                "parent_asin": x["asin"],
                "title": x["title"],
                "description": [x.get("description", "")],
                "store": x["brand"],
                "categories": x.get("categories", []),
                "main_category": "Tools",
            }
        )
        for x in meta
    ]
    return _write_gz(tmp / "Tools.jsonl.gz", r), _write_gz(tmp / "meta_Tools.jsonl.gz", m)


@pytest.mark.parametrize("year", [2014, 2018, 2023])
def test_amazon_loader_all_years(year: int, tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path, year)
    ds = load_amazon(reviews, meta)
    assert ds.meta["amazon_year"] == year
    assert ds.name == "Tools"
    assert ds.user_raw_ids == USERS  # SPARSE removed by the 5-core
    assert [it.raw_id for it in ds.items] == ITEMS  # NOTITLE dropped
    f = ds.meta["filtering"]
    assert f["items_without_title"] == 1 and f["interactions_on_dropped_items"] == 5
    assert f["duplicate_user_item"] == 1 and f["kcore_removed"] == 2
    assert ds.items[0].title == "Gadget 0 & case" and ds.items[0].brand == "Acme"
    assert ds.items[0].description == "Useful gadget 0" and ds.items[0].categories == ["Tools", "Kind 0"]
    # chronological, first (user, item) kept, ties in file order: U5 ends with B004 then B003
    assert ds.sequences[0] == [0, 1, 2, 3, 4]
    assert ds.sequences[5] == [0, 1, 2, 4, 3]
    assert ds.test[5] == Example(5, [0, 1, 2, 4], 3) and ds.valid[5] == Example(5, [0, 1, 2], 4)
    assert ds.train[5] == [0, 1, 2]
    check_split(ds)


def test_amazon_time_window_and_prepare(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path, 2018)
    out = tmp_path / "out"
    args = PrepareArgs(
        format="amazon",
        inter_path=str(reviews),
        item_path=str(meta),
        output_dir=str(out),
        min_interactions=3,
        end_time="2017-10-01",
        embed=False,
    )
    ds = prepare(args)
    # before 2017-10-01 (T0 + 79 days): the grid (days 0..29) only; U0's repeat (day 400) and U5's
    # tied pair (day 500) are outside, so U5 keeps 3 items, SPARSE (2) fails the 3-core
    assert ds.meta["filtering"]["outside_time_window"] == 3
    assert ds.meta["filtering"]["duplicate_user_item"] == 0
    assert ds.meta["filtering"]["time_range"][1] < "2017-10-01"
    assert ds.user_raw_ids == USERS and ds.sequences[5] == [0, 1, 2]
    assert read_json(out / "meta.json")["counts"] == ds.counts()
    assert (out / "items.jsonl").exists()


def test_amazon_urls_and_names() -> None:
    assert amazon_urls("Beauty", 2014) == (
        "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
        "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz",
    )
    base = "https://datarepo.eng.ucsd.edu/mcauley_group/data"
    assert amazon_urls("Industrial_and_Scientific", 2018) == (
        f"{base}/amazon_v2/categoryFiles/Industrial_and_Scientific.json.gz",
        f"{base}/amazon_v2/metaFiles2/meta_Industrial_and_Scientific.json.gz",
    )
    assert amazon_urls("Industrial_and_Scientific", 2023) == (
        f"{base}/amazon_2023/raw/review_categories/Industrial_and_Scientific.jsonl.gz",
        f"{base}/amazon_2023/raw/meta_categories/meta_Industrial_and_Scientific.jsonl.gz",
    )
    assert category_name("reviews_Beauty_5.json.gz") == "Beauty"
    assert category_name("Industrial_and_Scientific.jsonl.gz") == "Industrial_and_Scientific"


def test_kcore_is_iterative() -> None:
    # item "c" has 2 users; dropping user "z" (1 interaction) leaves "c" with 1: a second round removes it
    log = [("x", "a"), ("x", "b"), ("x", "c"), ("y", "a"), ("y", "b"), ("z", "c"), ("w", "a"), ("w", "b")]
    inters = [Interaction(u, i, float(t)) for t, (u, i) in enumerate(log)]
    kept, rounds = kcore(inters, 2)
    assert {(x.user, x.item) for x in kept} == {(u, i) for u, i in log if i != "c" and u != "z"}
    assert rounds == 2


def test_filter_options_validate() -> None:
    with pytest.raises(ValueError, match="split"):
        FilterOptions(split="random")
    with pytest.raises(ValueError, match="temporal"):
        FilterOptions(valid_start="2020-01-01")
