"""Batch export: resume after an interruption (torn last line included), atomic final files in
JSONL and Parquet, refusal to mix settings, bad user files (fast: a deterministic ranking
function stands in for the server; the real server is exercised in tests/test_serving_rank.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.io import DataError
from recipes.args import ExportArgs
from recipes.batch_export import PARTIAL, export


def fake_rank(body: dict) -> dict:
    """A deterministic answer per history (item i -> raw id str(i))."""
    h = [int(x) for x in body["history"]]
    items = []
    for r in range(body["k"]):
        item = (sum(h) * 7 + r * 13) % 1000
        if str(item) in set(body.get("sid_exclude", [])):
            continue
        items.append({"rank": r + 1, "sid": f"<a_{item % 7}><b_{item % 11}><c_{item}>", "score": -0.5 * r,
                      "item_ids": [item], "raw_ids": [str(item)], "titles": [f"Item {item}"]})  # fmt: skip
    return {"object": "sid.ranking", "k": body["k"], "items": items}


def users_file(tmp_path: Path, n: int = 40) -> Path:
    p = tmp_path / "users.jsonl"
    p.write_text(
        "".join(json.dumps({"user_id": f"u{u}", "history": [u, u + 1, 2 * u]}) + "\n" for u in range(n))
    )
    return p


def args_for(tmp_path: Path, out: str, **kw) -> ExportArgs:
    return ExportArgs(checkpoint=str(tmp_path), users_file=str(users_file(tmp_path)), output_dir=str(tmp_path / out),
                      k=5, concurrency=4, flush_every=3, **kw)  # fmt: skip


def test_interrupted_export_resumes_and_matches_a_clean_run(tmp_path):
    import pyarrow.parquet as pq

    clean = export(args_for(tmp_path, "clean"), fake_rank)
    assert clean["users"] == 40
    calls = []

    def dies_after_15(body):
        if len(calls) >= 15:
            raise KeyboardInterrupt  # what a kill would interrupt
        calls.append(body)
        return fake_rank(body)

    a = args_for(tmp_path, "resumed")
    with pytest.raises(KeyboardInterrupt):
        export(a, dies_after_15)
    out = Path(a.output_dir)
    assert not (out / "topk.jsonl").exists() and not (out / "meta.json").exists()
    done = (out / PARTIAL).read_text().splitlines()
    assert 1 <= len(done) <= 15
    with open(out / PARTIAL, "a") as fh:  # a kill in the middle of a line
        fh.write('{"user_id": "u39", "item_')
    seen = []
    meta = export(a, lambda body: seen.append(body) or fake_rank(body))
    assert len(seen) == 40 - len(done) and meta["ranked_now"] == len(seen)
    assert (out / "topk.jsonl").read_text() == (tmp_path / "clean" / "topk.jsonl").read_text()
    assert not (out / PARTIAL).exists()
    rows = [json.loads(x) for x in (out / "topk.jsonl").read_text().splitlines()]
    assert [r["user_id"] for r in rows] == [f"u{u}" for u in range(40)]  # input order, not finish order
    table = pq.read_table(out / "topk.parquet").to_pylist()
    assert table == rows
    assert all(len(r["item_ids"]) == len(r["sids"]) == len(r["scores"]) == 5 for r in rows)
    # a rerun after completion does nothing
    assert export(a, lambda body: pytest.fail("ranked again"))["users"] == 40


def test_export_refuses_to_mix_settings_and_rejects_bad_user_files(tmp_path):
    a = args_for(tmp_path, "out")

    def dies(body):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(a, dies)
    with pytest.raises(ValueError, match="started with other settings"):
        export(args_for(tmp_path, "out", exclude_seen=True), fake_rank)
    ex = export(args_for(tmp_path, "seen", exclude_seen=True), fake_rank)
    assert ex["users"] == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "a", "history": [1]}\n{"user_id": "a", "history": [2]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*user_id.*twice"):
        export(
            ExportArgs(checkpoint=str(tmp_path), users_file=str(bad), output_dir=str(tmp_path / "b")),
            fake_rank,
        )
    bad.write_text('{"user_id": "a", "history": "1,2"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1.*history"):
        export(
            ExportArgs(checkpoint=str(tmp_path), users_file=str(bad), output_dir=str(tmp_path / "b")),
            fake_rank,
        )
    with pytest.raises(ValueError, match="formats"):
        export(args_for(tmp_path, "f", formats=["csv"]), fake_rank)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("export_*.yaml")),
    ids=str,
)
def test_export_configs_parse(path):
    from trl import TrlParser

    (args,) = TrlParser((ExportArgs,)).parse_args_and_config(["--config", str(path)])
    assert (
        args.k >= 1 and args.split in ("valid", "test", "full") and set(args.formats) <= {"jsonl", "parquet"}
    )
