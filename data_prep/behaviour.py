"""Item embeddings from interactions (behaviour), and their fusion with text embeddings.

Semantic IDs built from text alone put items with similar descriptions under one prefix; items
bought together may share nothing textual. ``ppmi_svd`` embeds items by their co-occurrence in
users' training sequences (positive PMI of a windowed co-occurrence matrix, truncated SVD;
Levy & Goldberg's item2vec-equivalent factorisation, deterministic and seconds on CPU), so a
quantizer can also build SIDs for catalogues without text (Beauty here) or from both sources
(``fuse``). Only ``RecDataset.train`` sequences are read: validation and test targets never leak
into the SIDs. ``sid_tokenizer.build`` calls these (``embedding_source: behaviour | fused``).

Shapes: embeddings are ``(num_items, dim)`` float32 rows in catalogue order.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

# what sid_tokenizer.build quantizes: text embeddings, behaviour embeddings, or both (fuse)
EMBEDDING_SOURCES = ("text", "behaviour", "fused")


def cooccurrence(sequences: list[list[int]], num_items: int, window: int = 5):
    """Symmetric co-occurrence ``(num_items, num_items)`` scipy CSR: items ``d <= window`` apart in a
    sequence add ``1 / d`` (nearer neighbours weigh more). Self pairs (repeat purchases) are skipped."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for seq in sequences:
        s = np.asarray(seq, dtype=np.int64)
        if s.size and (s.min() < 0 or s.max() >= num_items):
            raise ValueError(
                f"sequence item id out of range [0, {num_items}): {int(s.min())}..{int(s.max())}"
            )
        for d in range(1, min(window, len(s) - 1) + 1):
            a, b = s[:-d], s[d:]
            keep = a != b
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
            vals += [np.full(int(keep.sum()), 1.0 / d)] * 2
    if not rows:
        return sparse.csr_matrix((num_items, num_items))
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return sparse.coo_matrix((v, (r, c)), shape=(num_items, num_items)).tocsr()  # duplicates are summed


def ppmi_svd(
    sequences: list[list[int]],
    num_items: int,
    dim: int = 64,
    window: int = 5,
    alpha: float = 0.75,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Behaviour embeddings ``(num_items, dim)`` float32 from PPMI-SVD of ``cooccurrence``.

    PMI(i, j) = log(C_ij * total / (C_i * P_alpha(j) * total)) with context counts smoothed by
    ``alpha`` (0.75, word2vec's), negative values clipped; rows are ``U * sqrt(S)`` of a truncated
    SVD. Items that never co-occur get a zero row (reported in the returned info dict).
    """
    from scipy import sparse
    from scipy.sparse.linalg import svds

    if not 1 <= dim < num_items:
        raise ValueError(f"dim must be in [1, {num_items}) for {num_items} items, got {dim}")
    counts = cooccurrence(sequences, num_items, window).tocoo()
    row_sum = np.asarray(counts.sum(1)).ravel()
    ctx = row_sum**alpha
    ctx_p = ctx / max(ctx.sum(), 1e-12)
    total = counts.sum()
    if total == 0:
        raise ValueError("no item pairs co-occur in the training sequences: no behaviour signal to embed")
    pmi = np.log(counts.data * total / (row_sum[counts.row] * ctx_p[counts.col] * total))
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape)
    rng = np.random.default_rng(seed)
    u, s, _ = svds(ppmi, k=dim, v0=rng.standard_normal(num_items), random_state=seed)
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    # the sign of singular vectors is arbitrary: fix it (largest-|.| entry positive) for reproducibility
    u = u * np.sign(u[np.abs(u).argmax(0), np.arange(dim)])
    emb = (u * np.sqrt(s)).astype(np.float32)
    cold = int((row_sum == 0).sum())
    info = {
        "method": "ppmi_svd",
        "dim": dim,
        "window": window,
        "alpha": alpha,
        "seed": seed,
        "pairs": int(counts.nnz),
        "ppmi_nonzeros": int(ppmi.nnz),
        "items_without_cooccurrence": cold,
        "singular_values_top5": [round(float(x), 4) for x in s[:5]],
    }
    if cold:
        logger.warning(
            "%d of %d items never co-occur in training sequences: zero behaviour rows", cold, num_items
        )
    return emb, info


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def fuse(text: np.ndarray, behaviour: np.ndarray, behaviour_weight: float = 0.5) -> np.ndarray:
    """``[sqrt(1 - w) * text_hat, sqrt(w) * behaviour_hat]`` with ``_hat`` = L2-normalised rows:
    squared distances split ``(1 - w) : w`` between the sources (w = ``behaviour_weight``)."""
    if text.shape[0] != behaviour.shape[0]:
        raise ValueError(
            f"text has {text.shape[0]} rows, behaviour {behaviour.shape[0]}: both need one per item"
        )
    if not 0.0 <= behaviour_weight <= 1.0:
        raise ValueError(f"behaviour_weight must be in [0, 1], got {behaviour_weight}")
    w = float(behaviour_weight)
    return np.concatenate(
        [np.sqrt(1 - w) * l2_normalise(text), np.sqrt(w) * l2_normalise(behaviour)], axis=1
    ).astype(np.float32)
