"""Atomic artifact writing and input reading with errors that name file, line and field."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _atomic_replace(Path(path), lambda fh: np.save(fh, array))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    On any exception the temporary directory is removed and ``path`` is left untouched,
    so a failed stage never leaves a half-written artifact directory behind.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def read_json(path: str | os.PathLike, reject_duplicate_keys: bool = True) -> Any:
    """Load a JSON file; malformed JSON raises DataError with the line and column.

    JSON objects silently keep the last of two equal keys; here a duplicate key (e.g. an item
    id listed twice in a catalogue) is an error that names the key.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_no_duplicates if reject_duplicate_keys else None)
    except _DuplicateKey as e:
        raise DataError(path, "duplicate key (each id may appear once)", key=str(e.args[0])) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from e
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text: {e}") from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line of a JSON-lines file."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    opener = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno) from e
            if not isinstance(obj, dict):
                raise DataError(
                    path, f"expected a JSON object per line, got {type(obj).__name__}", line=lineno
                )
            yield lineno, obj


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
