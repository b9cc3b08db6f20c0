"""Quantizer registry: name -> class. A new method is one ``Quantizer`` subclass and one line here.

Usage::

    q = make_quantizer("rkmeans", num_levels=3, codebook_size=256)
    codes = q.fit_encode(embeddings)          # (N, L) int64
    q.save("sid_dir/quantizer"); q = Quantizer.load("sid_dir/quantizer")
    new_codes = q.encode(new_embeddings)      # new items, no retraining
"""

from __future__ import annotations

from typing import Any

from sid_tokenizer.quantizers.base import Quantizer, QuantizerConfig, nearest, squared_distances
from sid_tokenizer.quantizers.kmeans import (
    BalancedConfig,
    BalancedKMeans,
    KMeansConfig,
    ResidualKMeans,
    capacity_assign,
)
from sid_tokenizer.quantizers.vq import ResidualVQQuantizer, RQVAEConfig, RQVAEQuantizer, RVQConfig

QUANTIZERS: dict[str, type[Quantizer]] = {
    "rkmeans": ResidualKMeans,
    "balanced": BalancedKMeans,
    "rqvae": RQVAEQuantizer,
    "rvq": ResidualVQQuantizer,
}


def make_quantizer(name: str, strict: bool = False, **options: Any) -> Quantizer:
    """Instantiate ``QUANTIZERS[name]`` with the options its config declares.

    With ``strict=False`` options that this quantizer does not use are ignored (a build config
    carries the options of every method); with ``strict=True`` they raise.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    klass = QUANTIZERS[name]
    return klass(klass.config_cls.from_dict(options, strict=strict))


__all__ = [
    "QUANTIZERS",
    "BalancedConfig",
    "BalancedKMeans",
    "KMeansConfig",
    "Quantizer",
    "QuantizerConfig",
    "RQVAEConfig",
    "RQVAEQuantizer",
    "RVQConfig",
    "ResidualKMeans",
    "ResidualVQQuantizer",
    "capacity_assign",
    "make_quantizer",
    "nearest",
    "squared_distances",
]
