"""The random-SID control of benchmarks/quantizer_ablation.py: unique codes of the right shape."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quantizer_ablation import random_assignment_error, random_codes


def test_random_codes_are_unique_and_in_range():
    codes = random_codes(4344, num_levels=3, codebook_size=256, seed=0)
    assert codes.shape == (4344, 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 256
    assert len({tuple(r) for r in codes.tolist()}) == len(codes)
    np.testing.assert_array_equal(codes, random_codes(4344, seed=0))
    assert not np.array_equal(codes, random_codes(4344, seed=1))
    # a full small grid: every cell exactly once
    full = random_codes(64, num_levels=3, codebook_size=4, seed=3)
    assert len({tuple(r) for r in full.tolist()}) == 64
    with pytest.raises(ValueError, match="do not fit"):
        random_codes(65, num_levels=3, codebook_size=4)


def test_random_assignment_error_is_relative():
    x = np.random.default_rng(0).normal(size=(200, 8))
    codes = random_codes(200, num_levels=2, codebook_size=16, seed=0)
    err = random_assignment_error(x, codes)
    assert 0.0 < err < 1.0
    # codes that identify every item reconstruct exactly at the last level
    exact = np.stack([np.zeros(200, dtype=np.int64), np.arange(200)], axis=1)
    assert random_assignment_error(x, exact) < 1e-12
