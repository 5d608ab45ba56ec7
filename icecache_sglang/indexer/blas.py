"""The BLAS thread count of this process, set at run time (NumPy has loaded its BLAS by then, so the
``OPENBLAS_NUM_THREADS`` variable would come too late).

The indexer runs its parallel work on numba's threads and its write workers; NumPy's few matmuls there (the
level-0 parent search of a Build, a query's projection) are small, and a multi-threaded BLAS under several
calling threads serializes them and leaves its own threads spinning on the cores numba needs
(``benchmarks/build_workers.py --blas``). Only OpenBLAS (NumPy's wheels) is handled; another BLAS is left alone.
"""

from __future__ import annotations

import ctypes
import functools

#: setters of OpenBLAS's thread count, by the names NumPy's bundled and system OpenBLAS builds export
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_GETTERS = tuple(s.replace("set_num", "get_num") for s in _SETTERS)


@functools.lru_cache(maxsize=1)
def _loaded_openblas() -> tuple[str, ...]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux ``/proc/self/maps``) once NumPy has
    loaded its own (they do not change after that)."""
    import numpy  # noqa: F401 - maps NumPy's OpenBLAS into the process

    try:
        with open("/proc/self/maps") as f:
            return tuple(sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}))
    except OSError:
        return ()


@functools.lru_cache(maxsize=None)
def _symbol(path: str, names: tuple[str, ...]):
    """The first of ``names`` that the library at ``path`` exports, or None."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:  # e.g. a mapping whose file is gone
        return None
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_int  # the getters' result; the setters return nothing
            return fn
    return None


def blas_threads() -> dict[str, int]:
    """Each loaded OpenBLAS's current thread count, by library path."""
    out = {}
    for path in _loaded_openblas():
        get = _symbol(path, _GETTERS)
        if get is not None:
            out[path] = int(get())
    return out


def set_blas_threads(n: int) -> dict[str, int]:
    """Set every loaded OpenBLAS to ``n`` threads; returns the thread counts it had, by library path (to
    restore them). Loads NumPy's BLAS first."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"BLAS threads must be a positive int, got {n!r}")
    before = blas_threads()
    for path in before:
        setter = _symbol(path, _SETTERS)
        if setter is not None:
            setter(ctypes.c_int(n))
    return before
