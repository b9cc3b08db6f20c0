"""Atomic artifact writing and input reading with errors that name file, line and field."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input: the message names the file, the line or key, and the field that is wrong."""

    def __init__(
        self,
        path: str | os.PathLike,
        message: str,
        *,
        line: int | None = None,
        key: str | None = None,
        field: str | None = None,
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if key is not None:
            where += f" [key {key!r}]"
        if field is not None:
            where += f" field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.key, self.field = str(path), line, key, field


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_replace(Path(path), lambda fh: fh.write(data))


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG, close it, and write the file atomically."""
    import io as _io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _atomic_replace(Path(path), lambda fh: np.save(fh, array))


# ---- output directories -----------------------------------------------------------------------
# A stage writes its output directory through ``atomic_directory``: everything is staged in a
# hidden sibling ``.<name>.<pid>.<random>.tmp`` that replaces ``<name>`` at the end (the old one is
# moved to ``.<name>.<pid>.old`` for the instant between the two renames). The staging folder is
# flock()ed while its writer lives; the kernel drops that lock when the process dies (kill -9
# included), so the next run into the same output can tell abandoned staging folders from those of
# a concurrent run and remove only the former.
# Only names that atomic_directory creates (tempfile.mkdtemp adds 8 characters of [a-z0-9_]); the
# second pattern of each pair is the naming of earlier versions (no pid), whose staging folders
# are stale by construction.
_STAGING_NAMES = (r"\d+\.[a-z0-9_]{8}\.tmp", r"[a-z0-9_]{8}\.tmp", r"\d+\.old", r"old-\d+")


def _is_inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(
    path: str | os.PathLike,
    stage: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    legacy_files: Iterable[str] = (),
) -> None:
    """Refuse an output directory that a stage must not replace, before any work is done.

    ``path`` may be absent, an empty directory, or a previous output of the same ``stage``: its
    ``meta.json`` has ``"stage": stage`` (or, for outputs written before stages were marked, it has
    no ``stage`` key and every one of ``legacy_files`` exists). Anything else -- a file, the folder
    that holds the input files, a dataset directory given as the output of another stage -- would
    be deleted by the replacement, so it is a DataError (field ``output_dir``). ``path`` must also
    neither be nor contain any of ``inputs`` (files or directories the stage reads), even when it
    is a previous output.
    """
    out = Path(path)
    resolved = out.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        if _is_inside(Path(inp).resolve(), resolved):
            raise DataError(
                out,
                f"is or contains the input {str(inp)!r}; refusing to replace it (the stage replaces its "
                "output directory as a whole): choose another output_dir",
                field="output_dir",
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise DataError(out, "exists and is not a directory; refusing to replace it", field="output_dir")
    entries = list(out.iterdir())
    if not entries:
        return
    meta_path = out / "meta.json"
    hint = "remove it yourself if it may go, or choose another output_dir"
    if not meta_path.is_file():
        raise DataError(
            out,
            f"exists and is not a {stage} output (no meta.json; it holds {len(entries)} entries such as "
            f"{sorted(e.name for e in entries)[:3]}); refusing to replace it: {hint}",
            field="output_dir",
        )
    try:
        meta = read_json(meta_path)
    except DataError as e:
        raise DataError(
            out,
            f"exists and its meta.json is unreadable ({e}); refusing to replace it: {hint}",
            field="output_dir",
        ) from None
    found = meta.get("stage") if isinstance(meta, dict) else None
    if found == stage:
        return
    legacy = tuple(legacy_files)
    if isinstance(meta, dict) and found is None and legacy and all((out / f).exists() for f in legacy):
        return
    what = f"a {found} output" if found else "not marked as any stage's output"
    raise DataError(
        out,
        f"exists and is {what}, not a {stage} output (meta.json 'stage'); refusing to replace it: {hint}",
        field="output_dir",
    )


def _lock_dir(path: Path) -> int | None:
    """Open ``path`` and take a non-blocking exclusive flock; the fd, or None if another process holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Remove staging folders of ``path`` left by killed writers; returns what was removed.

    Only hidden sibling directories named as ``atomic_directory`` names them
    (``.<name>.<pid>.<random>.tmp``, ``.<name>.<pid>.old`` and the pid-less names of earlier
    versions) that no live process holds locked are touched. If ``path`` itself is missing and such an ``.old`` folder exists (a writer died
    between moving the previous output aside and moving the new one in), the newest one is moved
    back to ``path`` instead of being removed: that is the last complete output.
    """
    final = Path(path)
    parent, name = final.parent, final.name
    if not parent.is_dir():
        return []
    ours = re.compile(rf"\.{re.escape(name)}\.(?:{'|'.join(_STAGING_NAMES)})")
    candidates = [e for e in parent.iterdir() if ours.fullmatch(e.name) and e.is_dir() and not e.is_symlink()]
    removed: list[Path] = []
    olds = sorted((c for c in candidates if not c.name.endswith(".tmp")), key=lambda c: c.stat().st_mtime)
    for entry in [c for c in candidates if c.name.endswith(".tmp")] + olds[::-1]:
        fd = _lock_dir(entry)
        if fd is None:  # a live writer holds it
            continue
        try:
            if not entry.name.endswith(".tmp") and not final.exists() and not final.is_symlink():
                os.replace(entry, final)
                logger.warning("restored %s from %s (a writer died while replacing it)", final, entry.name)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    if removed:
        logger.warning(
            "removed %d staging folder(s) of %s left by an interrupted run: %s",
            len(removed),
            final,
            [p.name for p in removed],
        )
    return removed


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    stage: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    legacy_files: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    On any exception the temporary directory is removed and ``path`` is left untouched,
    so a failed stage never leaves a half-written artifact directory behind. Staging folders
    of ``path`` abandoned by killed runs are removed first (``clean_stale_staging``). With
    ``stage`` the output directory is checked by ``check_output_dir`` (on entry and again just
    before the replacement): only an absent or empty directory, or an earlier output of the same
    stage that holds none of ``inputs``, is replaced.
    """
    final = Path(path)
    inputs = list(inputs)
    legacy_files = tuple(legacy_files)
    if stage is not None:
        check_output_dir(final, stage, inputs, legacy_files)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    lock = _lock_dir(tmp)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            if stage is not None:
                check_output_dir(final, stage, inputs, legacy_files)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = old_lock = None
        if final.exists():
            old_lock = _lock_dir(final)  # the lock moves with the folder: cleaners skip it
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if old_lock is not None:
            os.close(old_lock)
    finally:
        if lock is not None:
            os.close(lock)


# ---- reading text inputs --------------------------------------------------------------------------
# Every text input (JSON, JSON lines, CSV/TSV, Amazon dumps; plain or gzipped) is read through
# ``iter_lines`` / ``read_text``: bytes are decoded line by line so that a decoding error names its
# line, and a truncated or corrupt gzip stream, a NUL byte (a binary or UTF-16 file) or non-UTF-8
# text is a DataError instead of EOFError/UnicodeDecodeError from deep inside a loader.
_GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


def _open_binary(path: Path):
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.suffix == ".gz" or magic == b"\x1f\x8b":  # gzip by name or by content
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    if lineno == 1:
        for bom, name in _BOMS.items():
            if raw.startswith(bom):
                raise DataError(path, f"the file is {name} text (byte-order mark); save it as UTF-8", line=1)
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # spreadsheet exports start with a UTF-8 BOM
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            path,
            f"NUL byte at column {nul + 1}: this is not UTF-8 text (a binary, UTF-16 or corrupt file?)",
            line=lineno,
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path,
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1} ({e.reason}); "
            "re-save the file as UTF-8",
            line=lineno,
        ) from None


def _split_bare_cr(raw: bytes) -> list[bytes]:
    """Split on lone carriage returns (old Mac line endings), keeping each line's terminator."""
    if b"\r" not in raw.rstrip(b"\r\n"):
        return [raw]
    return [x for x in re.split(rb"(?<=\r)(?!\n)", raw) if x]


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (line number, line with its terminator) of a UTF-8 text file, gzipped or not.

    Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``; a leading UTF-8 byte-order mark is dropped.
    A missing file, a directory, a corrupt or truncated gzip stream, a NUL byte, a UTF-16 file
    and invalid UTF-8 are each a DataError naming the file (and the line where it was noticed).
    """
    path = Path(path)
    fh = _open_binary(path)
    lineno = 0
    with fh:
        try:
            for raw in fh:
                if lineno == 0 or b"\r" in raw or b"\0" in raw:  # the slow path: rare lines only
                    for part in _split_bare_cr(raw):
                        lineno += 1
                        yield lineno, _decode(path, lineno, part)
                    continue
                lineno += 1
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError:
                    _decode(path, lineno, raw)  # raises the DataError with the column
                    raise
        except _GZIP_ERRORS as e:
            raise DataError(
                path,
                f"corrupt or truncated gzip file after {lineno} complete line(s): {e}; "
                "download or compress it again",
                line=lineno + 1,
            ) from None


def read_text(path: str | os.PathLike) -> str:
    """The whole file (decoded and checked as ``iter_lines`` does), with its line endings."""
    return "".join(line for _, line in iter_lines(path))


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def _no_conflicting_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """A key repeated with the same value is harmless; with another value one of them would be lost."""
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: look at the repeated keys
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen and seen[k] != v:
                raise _DuplicateKey(k)
            seen[k] = v
    return obj


def read_json(path: str | os.PathLike, reject_duplicate_keys: bool = True) -> Any:
    """Load a JSON file; malformed JSON raises DataError with the line and column.

    JSON objects silently keep the last of two equal keys; here a duplicate key (e.g. an item
    id listed twice in a catalogue) is an error that names the key.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(path, "empty file: expected a JSON value", line=1)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates if reject_duplicate_keys else None)
    except _DuplicateKey as e:
        raise DataError(path, "duplicate key (each id may appear once)", key=str(e.args[0])) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


class _NonStandardConstant(Exception):
    pass


# Built once: json.loads(..., object_pairs_hook=...) builds a new decoder for every line.
_LINE_DECODER = json.JSONDecoder(object_pairs_hook=_no_conflicting_duplicates)
_STRICT_LINE_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_conflicting_duplicates, parse_constant=_no_constant
)


def parse_json_line(path: str | os.PathLike, lineno: int, line: str, allow_nan: bool = True) -> Any:
    """One JSON value of a JSON-lines file; a key repeated with another value is an error.

    With ``allow_nan`` False the non-standard ``NaN`` / ``Infinity`` literals are errors too (in
    an input file they are garbage that passes every comparison, e.g. a rating filter).
    """
    try:
        return (_LINE_DECODER if allow_nan else _STRICT_LINE_DECODER).decode(line)
    except _DuplicateKey as e:
        raise DataError(
            path, "key repeated in one object with different values", line=lineno, key=str(e.args[0])
        ) from None
    except _NonStandardConstant as e:
        raise DataError(
            path, f"{e.args[0]} is not valid JSON (write null for a missing value)", line=lineno
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply", line=lineno) from None


def iter_jsonl(
    path: str | os.PathLike, allow_nan: bool = True, check_keys: bool = True
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line of a JSON-lines file (maybe gzipped).

    ``allow_nan`` False: ``NaN`` / ``Infinity`` literals are DataErrors (input files).
    ``check_keys`` False skips the repeated-key check (files sidrec wrote itself: ~2x faster).
    """
    for lineno, line in iter_lines(path):
        line = line.strip()
        if not line:
            continue
        if check_keys:
            obj = parse_json_line(path, lineno, line, allow_nan)
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object per line, got {type(obj).__name__}", line=lineno)
        yield lineno, obj


def read_csv(
    path: str | os.PathLike, delimiter: str | None = None
) -> tuple[list[str], Iterator[tuple[int, dict[str, str | None]]]]:
    """Open a CSV/TSV file (maybe gzipped): (column names, iterator of (line, row dict)).

    The header is checked first: an empty file, a column name given twice (a dict per row would
    silently keep the last one) and a header that cannot be parsed are DataErrors on line 1.
    Columns without a name (a trailing comma in a spreadsheet export) are dropped, but a value
    in one is an error. A row with more fields than the header is an error; missing trailing
    fields are None. ``line`` is where the row ends (rows may span lines inside quotes).
    """
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.name.removesuffix(".gz").lower().endswith(".tsv") else ","
    lines = iter_lines(path)
    reader = csv.reader((line for _, line in lines), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(path, f"unreadable header: {e}", line=1) from None
    if not header or not any(h.strip() for h in header):
        raise DataError(path, "empty file: expected a header line", line=1)
    columns = [h.strip() for h in header]
    first: dict[str, int] = {}
    for pos, name in enumerate(columns, start=1):
        if not name:
            continue
        if name in first:
            raise DataError(
                path,
                f"column {name!r} appears twice in the header (columns {first[name]} and {pos}); "
                "one of them would be silently lost: rename or remove one",
                line=1,
                field=name,
            )
        first[name] = pos
    named = [(i, c) for i, c in enumerate(columns) if c]
    unnamed = [i for i, c in enumerate(columns) if not c]

    def rows() -> Iterator[tuple[int, dict[str, str | None]]]:
        try:
            for fields in reader:
                if not fields:
                    continue
                line = reader.line_num
                if len(fields) > len(columns):
                    raise DataError(
                        path,
                        f"row has more fields than the {len(columns)} columns of the header ({len(fields)} fields)",
                        line=line,
                    )
                for i in unnamed:
                    if i < len(fields) and fields[i].strip():
                        raise DataError(
                            path,
                            f"value {fields[i][:40]!r} in column {i + 1}, which has no name in the header",
                            line=line,
                        )
                yield line, {c: (fields[i] if i < len(fields) else None) for i, c in named}
        except csv.Error as e:
            raise DataError(path, f"malformed CSV: {e}", line=reader.line_num) from None

    return [c for c in columns if c], rows()


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
