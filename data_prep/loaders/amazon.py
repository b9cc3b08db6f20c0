"""Raw Amazon review dumps (2014, 2018, 2023) -> k-core filtered, leave-one-out ``RecDataset``.

Downloads (J. McAuley's group, UCSD; research use, cite the papers named in the README):

- 2014 (https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html), e.g. Beauty:
  http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz
  (5-core; ``reviews_Beauty.json.gz`` is the full file) and
  http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz.
  Review lines are JSON (``reviewerID, asin, unixReviewTime``); metadata lines are Python dict
  reprs (read with ``ast.literal_eval``, never ``eval``) with ``title, description, brand,
  categories`` (a list of category paths).
- 2018 (https://nijianmo.github.io/amazon/), e.g. Industrial and Scientific:
  https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/categoryFiles/Industrial_and_Scientific.json.gz
  (``categoryFilesSmall/Industrial_and_Scientific_5.json.gz`` is the 5-core) and
  https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/metaFiles2/meta_Industrial_and_Scientific.json.gz.
  Reviews as in 2014; metadata JSON lines with ``title, description`` (list), ``brand, category`` (list).
- 2023 (https://amazon-reviews-2023.github.io/), e.g. Industrial and Scientific:
  https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories/Industrial_and_Scientific.jsonl.gz
  and https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/meta_categories/meta_Industrial_and_Scientific.jsonl.gz.
  Reviews ``user_id, parent_asin, timestamp`` (milliseconds); metadata ``parent_asin, title,
  description`` (list), ``store, categories``.

The year is detected from the fields (and recorded in ``meta.json["amazon_year"]``). Items
whose metadata is missing or has no title are dropped with their interactions, and counted
(log + ``meta.json["filtering"]``); a repeated metadata line for one item (the 2018 dumps have
some) keeps the first. Then ``data_prep.kcore.build_dataset``: time window, (user, item)
de-duplication keeping the first, iterative k-core, chronological sequences, split.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from data_prep.dataset import Item, RecDataset
from data_prep.io import DataError, iter_lines, parse_json_line
from data_prep.kcore import FilterOptions, Interaction, build_dataset, parse_time
from data_prep.text import field_text

if TYPE_CHECKING:
    from data_prep.prepare import PrepareArgs

logger = logging.getLogger(__name__)

_SNAP = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
_V2 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
_V2023 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw"

# Review fields per schema (user, item, time); 2014 and 2018 share one.
_REVIEW_SCHEMAS = {
    "2014/2018": ("reviewerID", "asin", "unixReviewTime"),
    "2023": ("user_id", "parent_asin", "timestamp"),
}


def amazon_urls(category: str, year: int, five_core: bool | None = None) -> tuple[str, str]:
    """(reviews URL, metadata URL) of one category, e.g. ``("Beauty", 2014)``.

    ``five_core`` defaults to True for 2014 (the TIGER/LC-Rec Beauty benchmark file) and False
    otherwise (the k-core filter here does it); 2023 has no 5-core review file.
    """
    five_core = (year == 2014) if five_core is None else five_core
    if year == 2014:
        reviews = f"{_SNAP}/reviews_{category}{'_5' if five_core else ''}.json.gz"
        return reviews, f"{_SNAP}/meta_{category}.json.gz"
    if year == 2018:
        reviews = (
            f"{_V2}/categoryFilesSmall/{category}_5.json.gz"
            if five_core
            else f"{_V2}/categoryFiles/{category}.json.gz"
        )
        return reviews, f"{_V2}/metaFiles2/meta_{category}.json.gz"
    if year == 2023:
        if five_core:
            raise ValueError("Amazon 2023 has no 5-core review file; download the raw one and use k-core")
        return (
            f"{_V2023}/review_categories/{category}.jsonl.gz",
            f"{_V2023}/meta_categories/meta_{category}.jsonl.gz",
        )
    raise ValueError(f"year {year}: expected 2014, 2018 or 2023")


def _download(url: str, dest: Path) -> Path:
    """Stream ``url`` into ``dest`` atomically (temporary file, then rename); skip if present."""
    if dest.exists():
        logger.info("%s exists, not downloading again", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, os.fdopen(fd, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def download_amazon(
    category: str, year: int, dest: str | Path, five_core: bool | None = None
) -> tuple[Path, Path]:
    """Download one category's reviews and metadata into ``dest``; returns their local paths.

    Files are written atomically (a partial download never has the final name) and skipped
    when already present. Needs network access; usage::

        reviews, meta = download_amazon("Beauty", 2014, "raw/amazon14")
        # then: python -m data_prep.prepare --format amazon --inter_path <reviews> --item_path <meta>
    """
    dest = Path(dest)
    urls = amazon_urls(category, year, five_core)
    return tuple(_download(u, dest / u.rsplit("/", 1)[1]) for u in urls)  # type: ignore[return-value]


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """Yield (line, record, was_python_literal) for each non-empty line of a (gzipped) dump.

    Lines are JSON; the 2014 metadata lines are Python dict reprs, parsed with
    ``ast.literal_eval`` (literals only, never code). Decoding and gzip errors are those of
    ``data_prep.io.iter_lines`` (DataError with the line).
    """
    path = Path(path)
    for lineno, line in iter_lines(path):
        line = line.strip()
        if not line:
            continue
        literal = False
        if line.startswith("{") and "'" in line[:3]:  # a Python dict repr: {'asin': ...}
            rec, literal = _literal(path, lineno, line, None), True
        else:
            try:
                rec = parse_json_line(path, lineno, line, allow_nan=False)
            except DataError as e:
                if "malformed JSON" not in str(e):
                    raise
                rec, literal = _literal(path, lineno, line, str(e).split(": ", 1)[-1]), True
        if not isinstance(rec, dict):
            raise DataError(path, f"expected an object per line, got {type(rec).__name__}", line=lineno)
        yield lineno, rec, literal


def _literal(path: Path, lineno: int, line: str, json_error: str | None) -> Any:
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        why = f"neither JSON ({json_error}) nor" if json_error else "not"
        raise DataError(path, f"malformed line: {why} a Python dict literal", line=lineno) from None


def _str_field(path: Path, line: int, rec: dict, name: str) -> str:
    if name not in rec:
        raise DataError(path, f"missing field {name!r} (has {sorted(rec)[:8]})", line=line, field=name)
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise DataError(path, f"expected a non-empty string id, got {value!r}", line=line, field=name)
    return sys.intern(str(value).strip())  # ids repeat on many lines: one string each


def read_reviews(path: str | Path) -> tuple[list[Interaction], str]:
    """Read a review dump -> (interactions, schema: "2014/2018" or "2023")."""
    path = Path(path)
    inters: list[Interaction] = []
    schema = None
    fields: tuple[str, str, str] = ("", "", "")
    for line, rec, _ in tqdm(iter_records(path), desc=f"reading {path.name}", unit=" lines", mininterval=2):
        if schema is None:
            schema = (
                "2023" if "parent_asin" in rec or ("user_id" in rec and "timestamp" in rec) else "2014/2018"
            )
            fields = _REVIEW_SCHEMAS[schema]
        user = _str_field(path, line, rec, fields[0])
        item = _str_field(path, line, rec, fields[1])
        if fields[2] not in rec:
            raise DataError(path, f"missing field {fields[2]!r}", line=line, field=fields[2])
        t = rec[fields[2]]
        if isinstance(t, bool) or not isinstance(t, int | float | str):
            raise DataError(path, f"expected a number, got {t!r}", line=line, field=fields[2])
        # 2023 timestamps are milliseconds; parse_time reads each number in the unit that puts it
        # in 1980..2100 (a forced /1000 turned seconds into dates in January 1970)
        inters.append(Interaction(user, item, parse_time(t, path, line=line, field=fields[2]), line))
    if schema is None:
        raise DataError(path, "no review lines")
    return inters, schema


def read_metadata(path: str | Path, wanted: set[str]) -> tuple[dict[str, Item], dict[str, int], str]:
    """Read a metadata dump, keeping items in ``wanted`` -> (raw id -> Item, counts, detected year)."""
    path = Path(path)
    items: dict[str, Item] = {}
    counts = {"metadata_lines": 0, "metadata_duplicates": 0}
    untitled: set[str] = set()
    year = None
    for line, rec, literal in tqdm(
        iter_records(path), desc=f"reading {path.name}", unit=" lines", mininterval=2
    ):
        counts["metadata_lines"] += 1
        if year is None:
            if "parent_asin" in rec:
                year = "2023"
            elif literal or "categories" in rec or "related" in rec or "salesRank" in rec:
                year = "2014"
            else:
                year = "2018"
        raw = _str_field(path, line, rec, "parent_asin" if year == "2023" else "asin")
        if raw not in wanted:
            continue
        if raw in items:
            counts["metadata_duplicates"] += 1
            continue
        title = field_text(rec.get("title"), path, line=line, key=raw, field="title")
        if not title:
            untitled.add(raw)
            continue
        brand_field = "brand" if rec.get("brand") else "store"
        cat_field = "categories" if rec.get("categories") else "category"
        items[raw] = Item(
            item_id=-1,
            raw_id=raw,
            title=title,  # type: ignore[arg-type]
            description=field_text(rec.get("description"), path, line=line, key=raw, field="description"),  # type: ignore[arg-type]
            brand=field_text(rec.get(brand_field), path, line=line, key=raw, field=brand_field),  # type: ignore[arg-type]
            categories=field_text(
                rec.get(cat_field), path, line=line, key=raw, field=cat_field, categories=True
            ),  # type: ignore[arg-type]
        )
    if year is None:
        raise DataError(path, "no metadata lines")
    counts["items_without_title"] = len(untitled - set(items))
    return items, counts, year


def category_name(path: str | Path) -> str:
    """``reviews_Beauty_5.json.gz`` / ``Industrial_and_Scientific.jsonl.gz`` -> the category name."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name.removeprefix("reviews_").removeprefix("meta_").removesuffix("_5")


def load_amazon(
    reviews_path: str | Path,
    meta_path: str | Path,
    options: FilterOptions | None = None,
    name: str | None = None,
) -> RecDataset:
    """Load one category's review + metadata dumps (any year) into a filtered, split RecDataset."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    options = options or FilterOptions()
    inters, review_schema = read_reviews(reviews_path)
    catalogue, counts, year = read_metadata(meta_path, {x.item for x in inters})
    if (review_schema == "2023") != (year == "2023"):
        raise DataError(
            meta_path,
            f"metadata looks like Amazon {year} but the reviews {reviews_path} use the "
            f"{review_schema} fields; download both files of the same year",
            line=1,
        )
    known = set(catalogue)
    reviewed = {x.item for x in inters}
    counts["items_without_metadata"] = len(reviewed - known) - counts["items_without_title"]
    kept = [x for x in inters if x.item in known]
    counts["interactions_read"] = len(inters)
    counts["interactions_on_dropped_items"] = len(inters) - len(kept)
    if counts["interactions_on_dropped_items"]:
        logger.warning(
            "%s: dropped %d item(s) without a title and %d without metadata, with their %d interactions",
            reviews_path.name,
            counts["items_without_title"],
            counts["items_without_metadata"],
            counts["interactions_on_dropped_items"],
        )
    source = {"format": "amazon", "reviews": str(reviews_path), "metadata": str(meta_path)}
    ds = build_dataset(
        name or category_name(reviews_path), kept, catalogue, options, source, reviews_path, stats=counts
    )
    ds.meta["amazon_year"] = int(year)
    return ds


def load_from_args(args: PrepareArgs) -> RecDataset:
    """``format: amazon``: ``inter_path`` = review dump, ``item_path`` = metadata dump."""
    if args.inter_path is None or args.item_path is None:
        raise ValueError(
            "format amazon needs inter_path (reviews_X[_5].json.gz / X.json.gz / X.jsonl.gz) "
            "and item_path (meta_X.json.gz / meta_X.jsonl.gz)"
        )
    options = FilterOptions(
        args.min_interactions, args.start_time, args.end_time, args.split, args.valid_start, args.test_start
    )
    return load_amazon(args.inter_path, args.item_path, options, name=args.name)
