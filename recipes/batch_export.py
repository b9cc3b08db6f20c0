"""Batch export of top-K recommendations per user (the nightly candidate-generation job).

Entry script: ``recipes/export.py`` (arguments ``recipes.args.ExportArgs``).

Every user's ranked list comes from the served ranking route (``POST /v1/sid/rank``: the
constrained beam search that evaluation measures, with the catalogue's deactivated items and the
request's exclusions left out), from a server started here on ``checkpoint`` or an already
running one (``base_url``). Users come from a dataset split (``valid``/``test``: the history
before the held-out item; ``full``: each user's whole sequence, what production ranks) or from
``users_file`` (JSONL lines ``{"user_id": ..., "history": [raw item ids]}``).

Output (``output_dir``): ``topk.jsonl`` and ``topk.parquet``, one row per user with ``user_id``,
``item_ids``, ``raw_ids``, ``sids``, ``titles``, ``scores`` (aligned lists, best first), and
``meta.json``. Resumable: rows are appended to ``topk.partial.jsonl`` as users finish, a rerun
skips the users already there (a torn last line is dropped), and the final files are written
atomically (``meta.json`` last) before the partial file is removed. A rerun with different
settings than the partial file was started with stops with an error instead of mixing them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_prep.io import DataError, atomic_write_bytes, atomic_write_json, iter_jsonl, read_json
from recipes.args import ExportArgs

logger = logging.getLogger(__name__)

PARTIAL = "topk.partial.jsonl"
RUN = "topk.partial.run.json"
COLUMNS = ("user_id", "item_ids", "raw_ids", "sids", "titles", "scores")


def users_from_split(args: ExportArgs) -> Iterator[tuple[str, list[str]]]:
    from data_prep.dataset import RecDataset
    from sid_tokenizer.catalog import checkpoint_dataset_dir

    ds = RecDataset.load(checkpoint_dataset_dir(args.checkpoint, args.dataset_dir))
    raw = [it.raw_id for it in ds.items]
    if args.split == "full":
        for u, seq in enumerate(ds.sequences):
            yield ds.user_raw_ids[u], [raw[i] for i in seq]
    elif args.split in ("valid", "test"):
        for ex in getattr(ds, args.split):
            yield ds.user_raw_ids[ex.user_id], [raw[i] for i in ex.history]
    else:
        raise ValueError(f"split must be valid, test or full, got {args.split!r}")


def users_from_file(path: str | Path) -> Iterator[tuple[str, list[str]]]:
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        uid, hist = obj.get("user_id"), obj.get("history")
        if not isinstance(uid, str | int) or isinstance(uid, bool) or not str(uid).strip():
            raise DataError(path, "expected a non-empty user_id", line=lineno, field="user_id")
        if not isinstance(hist, list) or not all(
            isinstance(h, str | int) and not isinstance(h, bool) for h in hist
        ):
            raise DataError(path, "expected a list of raw item ids", line=lineno, field="history")
        uid = str(uid).strip()
        if uid in seen:
            raise DataError(path, f"user {uid!r} listed twice", line=lineno, field="user_id")
        seen.add(uid)
        yield uid, [str(h) for h in hist]


def read_partial(path: Path) -> dict[str, dict]:
    """Rows already exported; a last line torn by a kill is cut off the file."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        logger.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - good)
        with open(path, "r+b") as fh:
            fh.truncate(good)
    for lineno, line in enumerate(data[:good].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON: {e.msg}", line=lineno) from None
            rows[row["user_id"]] = row
    return rows


def _fingerprint(args: ExportArgs, users: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """What the partial file depends on: the ranking settings and the users' inputs."""
    keys = (
        "checkpoint",
        "split",
        "users_file",
        "k",
        "max_history",
        "exclude_seen",
        "sid_items",
        "sid_category",
        "sid_exclude",
    )
    h = hashlib.sha256(json.dumps(users, ensure_ascii=False).encode()).hexdigest()
    return {
        **{k: getattr(args, k) for k in keys},
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "users_sha256": h,
        "num_users": len(users),
    }


def _rank_body(args: ExportArgs, history: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"history": history, "k": args.k, "max_history": args.max_history}
    if args.sid_items:
        body["sid_items"] = list(args.sid_items)
    if args.sid_category:
        body["sid_category"] = args.sid_category
    # the whole history, not only the max_history items in the prompt (sid_exclude_seen)
    exclude = (list(history) if args.exclude_seen else []) + list(args.sid_exclude or [])
    if exclude:
        body["sid_exclude"] = sorted(set(exclude))
    return body


def to_row(user_id: str, answer: dict) -> dict[str, Any]:
    """A ranking answer -> one flat row (a SID shared by several items lists each of them)."""
    row: dict[str, Any] = {c: [] for c in COLUMNS[1:]}
    for it in answer["items"]:
        for item_id, raw, title in zip(it["item_ids"], it["raw_ids"], it["titles"], strict=True):
            row["item_ids"].append(item_id)
            row["raw_ids"].append(raw)
            row["titles"].append(title)
            row["sids"].append(it["sid"])
            row["scores"].append(it["score"])
    return {"user_id": user_id, **row}


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("item_ids", pa.list_(pa.int64())),
            ("raw_ids", pa.list_(pa.string())),
            ("sids", pa.list_(pa.string())),
            ("titles", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
        ]
    )
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def export(args: ExportArgs, rank_fn) -> dict[str, Any]:
    """Rank every user not yet in the partial file with ``rank_fn(body) -> answer`` and write
    the final files. Returns the meta written to ``meta.json``."""
    from data_prep.io import atomic_write_text

    out = Path(args.output_dir)
    unknown = sorted(set(args.formats) - {"jsonl", "parquet"})
    if unknown or not args.formats:
        raise ValueError(f"formats must be some of jsonl, parquet; got {args.formats}")
    users = list(users_from_file(args.users_file) if args.users_file else users_from_split(args))
    if args.max_users is not None:
        users = users[: args.max_users]
    fp = _fingerprint(args, users)
    if (out / "meta.json").exists() and read_json(out / "meta.json").get("fingerprint") == fp:
        logger.info("%s is complete for these settings: nothing to do", out)
        return read_json(out / "meta.json")
    out.mkdir(parents=True, exist_ok=True)
    partial, run = out / PARTIAL, out / RUN
    if partial.exists() and run.exists() and read_json(run) != fp:
        raise ValueError(
            f"{partial} was started with other settings ({run}); delete it or use another output_dir"
        )
    atomic_write_json(run, fp)
    done = read_partial(partial)
    todo = [(u, h) for u, h in users if u not in done]
    logger.info("%d users, %d done already, %d to rank", len(users), len(done), len(todo))
    t0 = time.perf_counter()
    with open(partial, "a", encoding="utf-8") as fh, cf.ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        bar = tqdm(total=len(users), initial=len(users) - len(todo), desc="export top-k", unit="user")
        futures = {pool.submit(rank_fn, _rank_body(args, h)): u for u, h in todo}
        for n, fut in enumerate(cf.as_completed(futures), start=1):
            row = to_row(futures[fut], fut.result())
            done[row["user_id"]] = row
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            if n % args.flush_every == 0:
                fh.flush()
                os.fsync(fh.fileno())
            bar.update()
        bar.close()
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    rows = [done[u] for u, _ in users]
    if "jsonl" in args.formats:
        atomic_write_text(out / "topk.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if "parquet" in args.formats:
        write_parquet(out / "topk.parquet", rows)
    meta = {
        "fingerprint": fp,
        "config": asdict(args),
        "users": len(rows),
        "ranked_now": len(todo),
        "seconds_now": round(seconds, 2),
        "users_per_second_now": round(len(todo) / seconds, 2) if todo else None,
        "files": [f"topk.{f}" for f in args.formats],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / "meta.json", meta)
    for p in (partial, run):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    logger.info("wrote %s (%d users; %d ranked in %.1f s)", out, len(rows), len(todo), seconds)
    return meta


def run_export(args: ExportArgs) -> dict[str, Any]:
    """``export`` against ``base_url``, or against a server started here on ``checkpoint``."""
    from recipes.client import SidRecClient
    from recipes.server import ServerConfig, free_port, start_server

    if args.base_url:
        client = SidRecClient(args.base_url, args.checkpoint, timeout=args.request_timeout)
        return export(args, client.rank_raw)
    config = ServerConfig(
        checkpoint=args.checkpoint,
        port=args.port or free_port(),
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
    )
    with start_server(config, Path(args.output_dir) / "server.log", timeout=args.startup_timeout) as server:
        client = SidRecClient(server.base_url, args.checkpoint, timeout=args.request_timeout)
        return export(args, client.rank_raw)
