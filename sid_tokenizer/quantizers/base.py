"""The residual quantizer interface shared by every method, and its save/load format.

Every quantizer maps item embeddings ``x`` (N, D) to codes (N, L) by greedy residual
quantization in a latent space: ``z = latent(x)`` (identity unless an encoder is learned),
then for each level ``l`` the code is the nearest codeword of ``codebooks[l]`` to the residual
``z - sum_{l' < l} codebooks[l'][code_l']``. Methods differ only in how they *fit* the
codebooks (and the encoder), so encoding new items, reconstruction and the per-level distances
used by collision resolution live here once.

Saved layout (``save(dir)``): ``quantizer.json`` (name, config, dims), ``codebooks.npz``
(``level_0 .. level_{L-1}``, each (K, d) float32) and, for learned encoders, ``model.pt``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from data_prep.embed import embedding_problem
from data_prep.io import DataError, atomic_write_bytes, atomic_write_json, read_json
from data_prep.sid_json import MAX_CODEBOOK_SIZE, MAX_LEVELS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class QuantizerConfig:
    """Options shared by every quantizer; subclasses add their own fields."""

    num_levels: int = 3
    codebook_size: int = 256
    seed: int = 42
    # CPU threads for faiss and torch while fitting (None: their defaults). On a shared,
    # oversubscribed CPU one thread is often faster than spin-waiting OpenMP teams.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"codebook_size must be <= {MAX_CODEBOOK_SIZE} (each code is one LLM token), got {self.codebook_size}"
            )
        if self.num_levels > MAX_LEVELS:
            raise ValueError(
                f"num_levels must be <= {MAX_LEVELS} (levels are named a..z), got {self.num_levels}"
            )

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.num_levels

    @classmethod
    def from_dict(cls, values: dict[str, Any], strict: bool = True) -> Self:
        """Build from a dict; unknown keys raise (``strict``) or are ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if strict and unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (N, d), b (K, d) -> (N, K) float32 squared Euclidean distances (clipped at 0)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d = (a * a).sum(1, keepdims=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def nearest(a: np.ndarray, b: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Index of the nearest row of b for each row of a: (N,) int64, computed in chunks."""
    out = np.empty(len(a), dtype=np.int64)
    b = np.asarray(b, dtype=np.float32)
    b_sq = (b * b).sum(1)[None, :]
    for s in range(0, len(a), chunk):
        part = np.asarray(a[s : s + chunk], dtype=np.float32)
        # ||a||^2 is constant per row, so the argmin only needs -2ab + ||b||^2
        out[s : s + chunk] = np.argmin(b_sq - 2.0 * (part @ b.T), axis=1)
    return out


def check_embeddings(x: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{what} must be a non-empty (items, dim) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the quantizer was fitted on {dim}")
    problem = embedding_problem(x)
    if problem is not None:  # checked before faiss sees them: it aborts the process on overflow
        raise ValueError(f"{what}: {problem}")
    return np.ascontiguousarray(x, dtype=np.float32)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` faiss/torch CPU threads (no-op for None), then restore them."""
    if n is None:
        yield
        return
    import faiss

    old_faiss = faiss.omp_get_max_threads()
    torch = sys.modules.get("torch")
    old_torch = torch.get_num_threads() if torch is not None else None
    faiss.omp_set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        if torch is not None:
            torch.set_num_threads(old_torch)


class Quantizer:
    """Base class: subclasses set ``name``, ``config_cls`` and implement ``_fit``.

    State after ``fit``: ``codebooks`` (list of L float32 arrays (K, d)) and ``input_dim`` (D).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[QuantizerConfig]] = QuantizerConfig

    def __init__(self, config: QuantizerConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )
        self.codebooks: list[np.ndarray] = []
        self.input_dim: int | None = None
        self._train_codes: np.ndarray | None = None

    # ---- fitting -------------------------------------------------------------------------
    def fit(self, embeddings: np.ndarray) -> Self:
        """Learn the codebooks (and encoder) from embeddings (N, D). Returns self."""
        x = check_embeddings(embeddings)
        if len(x) < self.config.codebook_size:
            raise ValueError(
                f"{len(x)} items is fewer than codebook_size {self.config.codebook_size}; "
                "use a smaller codebook"
            )
        self.input_dim = int(x.shape[1])
        with cpu_threads(self.config.num_threads):
            self._train_codes = self._fit(x)
        return self

    def fit_encode(self, embeddings: np.ndarray) -> np.ndarray:
        """Fit, then return the codes (N, L) of the training items.

        Equal to ``encode`` except for methods whose training assignment is constrained
        (``balanced``: capacity-limited clusters), which return that assignment.
        """
        self.fit(embeddings)
        if self._train_codes is not None:
            return self._train_codes
        return self.encode(embeddings)

    def _fit(self, x: np.ndarray) -> np.ndarray | None:
        """Fit on float32 x (N, D); optionally return the training codes (N, L)."""
        raise NotImplementedError

    # ---- the latent space (identity unless a subclass learns an encoder) -----------------
    def latent(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d) points that the codebooks quantize."""
        return x

    def decode_latent(self, z: np.ndarray) -> np.ndarray:
        """(N, d) -> (N, D)."""
        return z

    # ---- using a fitted quantizer --------------------------------------------------------
    @property
    def level_sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.codebooks)

    def _require_fitted(self) -> None:
        if not self.codebooks:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load() first")

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) -> codes (N, L) int64, greedy residual nearest codeword."""
        self._require_fitted()
        residual = self.latent(check_embeddings(embeddings, self.input_dim)).copy()
        codes = np.empty((len(residual), len(self.codebooks)), dtype=np.int64)
        for lv, cb in enumerate(self.codebooks):
            codes[:, lv] = nearest(residual, cb)
            residual -= cb[codes[:, lv]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, L) -> reconstructed embeddings (N, D)."""
        self._require_fitted()
        codes = self.check_codes(codes)
        z = np.zeros((len(codes), self.codebooks[0].shape[1]), dtype=np.float32)
        for lv, cb in enumerate(self.codebooks):
            z += cb[codes[:, lv]]
        return self.decode_latent(z)

    reconstruct = decode

    def level_distances(self, embeddings: np.ndarray, codes: np.ndarray, level: int) -> np.ndarray:
        """Squared distance (N, K) from each item's residual at ``level`` to every codeword there.

        The residual subtracts the codewords of ``codes[:, :level]`` from the item's latent,
        so the row is the cost of giving the item each code at ``level`` after that prefix.
        """
        self._require_fitted()
        codes = np.asarray(codes, dtype=np.int64)
        residual = self.latent(check_embeddings(embeddings, self.input_dim)).copy()
        for lv in range(level):
            residual -= self.codebooks[lv][codes[:, lv]]
        return squared_distances(residual, self.codebooks[level])

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(self.codebooks):
            raise ValueError(f"codes must have shape (items, {len(self.codebooks)}), got {codes.shape}")
        if (codes < 0).any() or (codes >= np.asarray(self.level_sizes)).any():
            raise ValueError(f"codes out of range of codebook sizes {self.level_sizes}")
        return codes

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``quantizer.json`` + ``codebooks.npz`` (+ subclass files) atomically per file."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{f"level_{lv}": cb for lv, cb in enumerate(self.codebooks)})
        atomic_write_bytes(directory / "codebooks.npz", buf.getvalue())
        self._save_extra(directory)
        # the json goes last: its presence marks a complete save
        atomic_write_json(
            directory / "quantizer.json",
            {
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "config": asdict(self.config),
                "input_dim": self.input_dim,
                "level_sizes": list(self.level_sizes),
                "latent_dim": int(self.codebooks[0].shape[1]),
            },
        )
        return directory

    def _save_extra(self, directory: Path) -> None:
        """Subclasses with more state (e.g. an encoder) write it here."""

    def _load_extra(self, directory: Path, meta: dict[str, Any]) -> None:
        """Counterpart of ``_save_extra``."""

    @classmethod
    def load(cls, directory: str | Path) -> Quantizer:
        """Load any registered quantizer from ``directory`` (the class is read from the file)."""
        from sid_tokenizer.quantizers import QUANTIZERS

        directory = Path(directory)
        meta_path = directory / "quantizer.json"
        meta = read_json(meta_path)
        name = meta.get("name")
        if name not in QUANTIZERS:
            raise DataError(
                meta_path, f"unknown quantizer {name!r}; expected one of {sorted(QUANTIZERS)}", field="name"
            )
        klass = QUANTIZERS[name]
        if cls is not Quantizer and not issubclass(klass, cls):
            raise DataError(meta_path, f"holds a {name!r} quantizer, not {cls.name!r}", field="name")
        try:
            config = klass.config_cls.from_dict(meta.get("config", {}))
        except (TypeError, ValueError) as e:
            raise DataError(meta_path, str(e), field="config") from e
        q = klass(config)
        sizes = meta.get("level_sizes")
        if not isinstance(meta.get("input_dim"), int) or meta["input_dim"] < 1:
            raise DataError(
                meta_path, f"expected a positive integer, got {meta.get('input_dim')!r}", field="input_dim"
            )
        if not isinstance(sizes, list) or not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise DataError(
                meta_path, f"expected a list of codebook sizes, got {sizes!r}", field="level_sizes"
            )
        q.input_dim = meta["input_dim"]
        npz_path = directory / "codebooks.npz"
        if not npz_path.exists():
            raise DataError(npz_path, "file not found (incomplete quantizer directory)")
        try:
            with np.load(npz_path) as npz:
                q.codebooks = [np.asarray(npz[f"level_{lv}"], dtype=np.float32) for lv in range(len(sizes))]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(npz_path, f"unreadable codebooks: {e}") from None
        if [len(c) for c in q.codebooks] != list(sizes):
            raise DataError(
                npz_path,
                f"codebook sizes {[len(c) for c in q.codebooks]} differ from "
                f"quantizer.json level_sizes {sizes}",
            )
        for lv, cb in enumerate(q.codebooks):
            problem = embedding_problem(cb) if cb.ndim == 2 else f"shape {cb.shape} is not (codes, dim)"
            if problem is not None:
                raise DataError(npz_path, f"codebook of level {lv}: {problem}", key=f"level_{lv}")
        q._load_extra(directory, meta)
        return q
