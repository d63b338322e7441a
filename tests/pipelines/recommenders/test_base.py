"""The shared ``topk``: its result is defined by the scores alone (ties by index)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.recommenders.base import topk

ROOT = Path(__file__).resolve().parents[3]


def _reference(scores: np.ndarray, k: int) -> np.ndarray:
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.array([sorted(range(s.shape[1]), key=lambda j: (-s[r, j], j))[:k]
                     for r in range(s.shape[0])], dtype=np.int64).reshape(s.shape[0], -1)


@pytest.mark.parametrize("seed", range(4))
def test_topk_equals_a_full_sort_by_score_then_index_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        b, n = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        k = int(rng.integers(0, n + 3))
        s = rng.integers(0, 4, (b, n)).astype(rng.choice([np.float32, np.float64]))
        s[rng.random((b, n)) < 0.2] = -np.inf
        s[rng.random((b, n)) < 0.1] = np.inf
        if rng.random() < 0.3:
            s[rng.random((b, n)) < 0.2] = np.nan
        got = topk(s, k)
        want = _reference(s, min(k, n))
        assert got.shape == (b, min(k, n))
        np.testing.assert_array_equal(got, want)


def test_topk_breaks_ties_at_the_cut_by_the_lower_index():
    s = np.array([[1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 0.0]])
    np.testing.assert_array_equal(topk(s, 3), [[1, 4, 0]])
    np.testing.assert_array_equal(topk(s, 5), [[1, 4, 0, 2, 3]])
    np.testing.assert_array_equal(topk(np.zeros((2, 5)), 2), [[0, 1], [0, 1]])


def test_topk_large_rows_with_many_ties_match_the_reference():
    rng = np.random.default_rng(7)
    s = rng.integers(0, 3, (3, 5000)).astype(np.float32)
    np.testing.assert_array_equal(topk(s, 50), _reference(s, 50))


def test_topk_rejects_a_non_matrix():
    with pytest.raises(ValueError, match="2-d"):
        topk(np.zeros(5), 2)


_SCRIPT = """
import numpy as np
from pipelines.recommenders.base import topk
s = np.random.default_rng(3).integers(0, 20, (64, 3000)).astype(np.float32)
print(topk(s, 100).tobytes().hex())
"""


def test_topk_gives_the_same_lists_with_numpys_avx512_kernels_disabled():
    """NumPy picks its partition kernels by CPU: run once as this CPU allows, once restricted
    to the AVX2 ones (a no-op on a CPU without AVX-512, where this cannot fail)."""
    def run(extra):
        env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    assert run({}) == run({"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"})
