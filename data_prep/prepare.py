"""Entry point: raw data -> dataset directory (+ item text embeddings).

    python -m data_prep.prepare --config data_prep/configs/scientific.yaml [--output_dir ...]

Reads one of the registered input formats (``LOADERS``), renders item text, writes the
dataset directory atomically, then embeds item text (cached by encoder + text hash; a cache
shipped beside the input files, e.g. the vendored ``data/scientific/embeddings``, is reused).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.dataset import DATASET_FILES, STAGE, RecDataset
from data_prep.embed import DEFAULT_ENCODER, embed_items, embeddings_path, text_hash
from data_prep.io import DataError, atomic_directory, check_output_dir, read_json
from data_prep.kcore import check_split
from data_prep.loaders import amazon, generic, minionerec
from data_prep.loaders.lcrec import load_lcrec
from data_prep.provenance import run_info
from data_prep.sid_json import read_sid_index_json, write_sid_index_json
from data_prep.text import DEFAULT_TEMPLATE, render_item_text, template_fields

logger = logging.getLogger(__name__)


@dataclass
class PrepareArgs:
    format: str = field(default="lcrec", metadata={"help": "input format: one of data_prep.prepare.LOADERS"})
    inter_path: str | None = field(default=None, metadata={"help": "interactions file (format-specific)"})
    item_path: str | None = field(default=None, metadata={"help": "item catalogue file (optional for lcrec)"})
    extra_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "format-specific extra inputs (e.g. MiniOneRec valid/test CSVs)"},
    )
    valid_csv: str | None = field(default=None, metadata={"help": "MiniOneRec valid CSV (format minionerec)"})
    test_csv: str | None = field(default=None, metadata={"help": "MiniOneRec test CSV (format minionerec)"})
    sid_index_path: str | None = field(
        default=None,
        metadata={
            "help": "third-party SID index (item id -> SID tokens) to keep as sids/index.json "
            "(minionerec: defaults to X.index.json beside X.item.json)"
        },
    )
    name: str | None = field(default=None, metadata={"help": "dataset name (default: from the file name)"})
    output_dir: str = field(
        default="outputs/scientific/dataset", metadata={"help": "dataset directory to write"}
    )
    min_interactions: int = field(
        default=5, metadata={"help": "k for k-core filtering (raw/generic formats)"}
    )
    start_time: str | None = field(default=None, metadata={"help": "keep interactions at/after (ISO date)"})
    end_time: str | None = field(default=None, metadata={"help": "keep interactions before (ISO date)"})
    split: str = field(
        default="leave_one_out", metadata={"help": "amazon/generic: leave_one_out or temporal"}
    )
    valid_start: str | None = field(
        default=None,
        metadata={
            "help": "temporal split: validation targets from this ISO time (default: 80% time quantile)"
        },
    )
    test_start: str | None = field(
        default=None,
        metadata={"help": "temporal split: test targets from this ISO time (default: 90% time quantile)"},
    )
    events: list[str] = field(
        default_factory=list, metadata={"help": "generic: keep only these event types (empty: all)"}
    )
    min_rating: float | None = field(default=None, metadata={"help": "generic: keep ratings >= this"})
    text_template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "item text template"})
    max_description_chars: int = field(default=300, metadata={"help": "truncate descriptions"})
    embed: bool = field(default=True, metadata={"help": "compute item text embeddings"})
    encoder: str = field(default=DEFAULT_ENCODER, metadata={"help": "sentence-transformers id or path"})
    embed_batch_size: int = 64
    embedding_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "directory whose embeddings/<encoder>.npy/.json may be reused "
            "when the text hash matches (default: the directory of inter_path)"
        },
    )


def _load_lcrec(args: PrepareArgs) -> RecDataset:
    if args.inter_path is None:
        raise ValueError("format lcrec needs inter_path (X.inter.json)")
    return load_lcrec(args.inter_path, args.item_path, name=args.name)


LOADERS: dict[str, Callable[[PrepareArgs], RecDataset]] = {
    "lcrec": _load_lcrec,
    "minionerec": minionerec.load_from_args,
    "amazon": amazon.load_from_args,
    "generic": generic.load_from_args,
}


def _reuse_cached_embeddings(
    args: PrepareArgs, out: Path, texts: list[str], cache_dir: Path | None = None
) -> None:
    """Copy a shipped embedding cache into the dataset dir when its text hash matches."""
    if cache_dir is None:
        if args.embedding_cache_dir is None and args.inter_path is None:
            return
        cache_dir = Path(args.embedding_cache_dir or Path(args.inter_path).parent)
    src = embeddings_path(cache_dir, args.encoder)
    if not (src.exists() and src.with_suffix(".json").exists()):
        return
    meta = read_json(src.with_suffix(".json"))
    if meta.get("encoder") == args.encoder and meta.get("text_sha256") == text_hash(texts):
        dst = embeddings_path(out, args.encoder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copyfile(src.with_suffix(".json"), dst.with_suffix(".json"))
        logger.info("reused shipped embeddings %s", src)
    else:
        logger.info("shipped embeddings %s do not match this item text; recomputing", src)


def _check_template(template: str, ds: RecDataset) -> None:
    """Every field the item text template names must be an item column (DataError on the items file)."""
    names = template_fields(template)  # a malformed template is a ValueError (config, not data)
    columns = {"title", "brand", "categories", "description"} | (
        set(ds.items[0].extra) if ds.items else set()
    )
    missing = [n for n in names if n not in columns]
    if missing:
        source = ds.meta.get("source") or {}
        where = source.get("items") or source.get("metadata") or f"<items of {ds.name}>"
        raise DataError(
            where,
            f"the item text template {template!r} names {missing[0]!r}, which is not a column of the "
            f"items; the columns are {sorted(columns)}",
            field=missing[0],
        )


def _input_paths(args: PrepareArgs, ds: RecDataset | None = None, sid_source: str | None = None) -> list[str]:
    """Every file or folder this run reads: ``output_dir`` must be none of them and hold none."""
    paths = [args.inter_path, args.item_path, args.valid_csv, args.test_csv, args.sid_index_path, sid_source]
    paths += list(args.extra_paths)
    if (
        args.embedding_cache_dir
        and Path(args.embedding_cache_dir).resolve() != Path(args.output_dir).resolve()
    ):
        paths.append(args.embedding_cache_dir)  # (a rerun may reuse the embeddings of its own output)
    source = (ds.meta.get("source") if ds is not None else None) or {}
    paths += [v for v in source.values() if isinstance(v, str) and not v.startswith("<") and Path(v).exists()]
    return [str(p) for p in paths if p]


def prepare(args: PrepareArgs, dataset: RecDataset | None = None) -> RecDataset:
    """Load (or take ``dataset``, e.g. from ``generic.load_generic`` on a HF dataset), render item
    text, check the split, and write the dataset directory with its SID index and embeddings.

    Everything is staged in a temporary sibling directory that replaces ``output_dir`` only at the
    end: a failure at any step leaves no partial directory (and an earlier good one unchanged).
    ``output_dir`` is replaced only when it is absent, empty or an earlier dataset directory, and
    when it neither is nor contains an input (``data_prep.io.check_output_dir``); staging folders
    left by a killed run are removed.
    """
    out = Path(args.output_dir)
    check_output_dir(out, STAGE, _input_paths(args), DATASET_FILES)  # before the (long) loading
    if dataset is None:
        if args.format not in LOADERS:
            raise ValueError(f"unknown format {args.format!r}; choose one of {sorted(LOADERS)}")
        dataset = LOADERS[args.format](args)
    ds = dataset
    _check_template(args.text_template, ds)
    for it in ds.items:
        it.text = render_item_text(it, args.text_template, args.max_description_chars)
    check_split(ds)
    sid_source = ds.meta.get("sid_index_source") or args.sid_index_path
    sid_index = None
    if sid_source is not None:  # validated before anything is written
        sid_index = read_sid_index_json(sid_source, raw_ids=[it.raw_id for it in ds.items])
        ds.meta.update(sid_index=minionerec.SID_INDEX_FILE, sid_index_source=str(sid_source))
    inputs = _input_paths(args, ds, sid_source)
    with atomic_directory(out, stage=STAGE, inputs=inputs, legacy_files=DATASET_FILES) as stage:
        ds.write(
            stage,
            extra_meta={
                "text_template": args.text_template,
                "max_description_chars": args.max_description_chars,
                **run_info(),
            },
        )
        if sid_index is not None:
            keys, codes, _ = sid_index
            write_sid_index_json(stage / minionerec.SID_INDEX_FILE, keys, codes)
        if args.embed:
            texts = [it.text for it in ds.items]
            if not any(texts):
                logger.warning("no item text (interactions-only data): skipping embeddings")
            else:
                _reuse_cached_embeddings(args, stage, texts)
                if out.exists():  # an earlier run into the same directory
                    _reuse_cached_embeddings(args, stage, texts, cache_dir=out)
                embed_items(stage, texts, args.encoder, batch_size=args.embed_batch_size)
    logger.info("wrote %s: %s", out, ds.counts())
    return ds


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((PrepareArgs,)).parse_args_and_config()
    try:
        prepare(args)
    except DataError as e:  # bad input: the message says where; a traceback would only bury it
        logger.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
