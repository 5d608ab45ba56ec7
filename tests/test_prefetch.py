import numpy as np
from numba import njit

from icecache_sglang.index.prefetch import prefetch_bytes, prefetch_row


@njit(cache=False)
def _sum_with_hints(a, ahead):
    s = 0.0
    for i in range(a.shape[0]):
        prefetch_row(a, i + ahead)  # past the end too: a hint never faults
        prefetch_bytes(a, (i + ahead) * a.strides[0], a.strides[0])
        for j in range(a.shape[1]):
            s += a[i, j]
    return s


def test_prefetch_is_a_hint_that_changes_no_result():
    """``prefetch_row`` / ``prefetch_bytes`` compile into a loop over rows (strided views too), change no value it
    reads, and ignore addresses past the array."""
    a = np.arange(300 * 40, dtype=np.float32).reshape(300, 40)
    for ahead in (0, 8, 10_000):
        assert _sum_with_hints(a, ahead) == float(a.astype(np.float64).sum())
    v = a[::3]  # a view with a larger row stride
    assert _sum_with_hints(v, 4) == float(v.astype(np.float64).sum())
