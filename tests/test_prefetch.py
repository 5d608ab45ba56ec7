import numpy as np
from numba import njit

from icecache_sglang.index.prefetch import LINE, lines_of, prefetch_bytes, prefetch_row


@njit(cache=False)
def _sum_with_hints(a, ahead):
    s = 0.0
    for i in range(a.shape[0]):
        prefetch_row(a, i + ahead)  # past the end too: a hint never faults
        prefetch_bytes(a, (i + ahead) * a.strides[0], a.strides[0])
        for j in range(a.shape[1]):
            s += a[i, j]
    return s


@njit(cache=False)
def _lines(start, n):
    first, stop = lines_of(start, n)
    return np.arange(first, stop, LINE)


def test_prefetch_is_a_hint_that_changes_no_result():
    """``prefetch_row`` / ``prefetch_bytes`` compile into a loop over rows, change no value it reads, and ignore
    addresses past the array."""
    a = np.arange(300 * 40, dtype=np.float32).reshape(300, 40)
    for ahead in (0, 8, 10_000):
        assert _sum_with_hints(a, ahead) == float(a.astype(np.float64).sum())
    v = a[::3]  # a view with a larger row stride
    assert _sum_with_hints(v, 4) == float(v.astype(np.float64).sum())


def test_every_line_a_range_touches_is_fetched():
    """The lines prefetched for ``n`` bytes from ``start`` are exactly those the bytes lie in, also when
    ``start`` is not on a line (NumPy's large arrays start 16 bytes into one)."""
    for start in (4096, 4096 + 16, 4096 + 63):
        for n in (1, 16, 64, 160, 512, 2112):
            want = np.unique((start + np.arange(n)) // LINE * LINE)
            assert (_lines(start, n) == want).all(), (start, n)
