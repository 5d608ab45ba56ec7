"""How the index stores key rows: float32, or bfloat16 bits in uint16 (half the bytes, the dtype most models'
KV cache has). Scores always accumulate in float32.

numba has no 16-bit float type, so a bfloat16 value is kept as the upper 16 bits of its float32 pattern and
widened in registers (``bf16_to_f32``: zero-extend, shift, bitcast; vectorised by LLVM). ``key_dot`` takes a
key row of either dtype and ``as_f32`` a flat run of rows (the scan's), so every kernel compiles one
specialization per storage dtype.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

#: the ``key_dtype`` values an index accepts -> the NumPy dtype of its ``page_keys``
STORAGE = {"float32": np.float32, "bfloat16": np.uint16}
#: below this many values the conversions (and ``transform.key_projection``) run on one thread: waking numba's
#: pool for a decode insert's few rows cost more than the work (2-5 ms per call next to a 128k-token index on
#: 2 cores, index_speed.py)
PARALLEL_MIN = 1 << 16


def to_storage(keys: np.ndarray, key_dtype: str) -> np.ndarray:
    """float32 keys -> the storage dtype (bfloat16: round to nearest, ties to even, as torch does)."""
    k = np.ascontiguousarray(keys, dtype=np.float32)
    if key_dtype == "float32":
        return k
    out = np.empty(k.shape, np.uint16)
    (_round_bf16 if k.size >= PARALLEL_MIN else _round_bf16_serial)(k.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


def from_storage(stored: np.ndarray) -> np.ndarray:
    """Stored key rows -> float32 (exact: every bfloat16 value is a float32 value)."""
    if stored.dtype == np.uint16:
        flat = np.ascontiguousarray(stored)
        out = np.empty(flat.shape, np.float32)
        (_widen_bf16 if flat.size >= PARALLEL_MIN else _widen_bf16_serial)(flat.reshape(-1), out.reshape(-1).view(np.uint32))
        return out
    return np.asarray(stored, dtype=np.float32)


@njit(cache=True, nogil=True, parallel=True)
def _round_bf16(bits, out):
    for i in prange(bits.shape[0]):
        _round_one(bits, out, i)


@njit(cache=True, nogil=True)
def _round_bf16_serial(bits, out):
    for i in range(bits.shape[0]):
        _round_one(bits, out, i)


@njit(cache=True, nogil=True, inline="always")
def _round_one(bits, out, i):
    b = bits[i]
    if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (b & np.uint32(0x007FFFFF)) != 0:
        out[i] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))  # NaN stays NaN (quiet)
    else:
        out[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, nogil=True, parallel=True)
def _widen_bf16(u, out_bits):
    for i in prange(u.shape[0]):
        out_bits[i] = np.uint32(u[i]) << np.uint32(16)


@njit(cache=True, nogil=True)
def _widen_bf16_serial(u, out_bits):
    for i in range(u.shape[0]):
        out_bits[i] = np.uint32(u[i]) << np.uint32(16)


def round_keys(keys: np.ndarray, key_dtype: str) -> np.ndarray:
    """The float32 values an index with ``key_dtype`` scores with (what a reference must use)."""
    return from_storage(to_storage(keys, key_dtype))


@intrinsic
def bf16_to_f32(typingctx, x):
    """uint16 bfloat16 bits -> float32 (numba)."""
    if x == types.uint16:
        def codegen(context, builder, sig, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen
    return None


def key_dot(k, q):
    """``<k, q>`` in float32 for a stored key row ``k`` (float32 or bfloat16 bits) and a float32 ``q``."""
    raise NotImplementedError("numba only")


def as_f32(rows, n, scratch):
    """The first ``n`` values of flat stored rows as float32 (numba): ``rows`` itself when it is float32,
    else widened into the float32 ``scratch`` (no copy on the float32 path)."""
    raise NotImplementedError("numba only")


@overload(key_dot, jit_options={"fastmath": True})
def _key_dot(k, q):
    if k.dtype == types.uint16:
        def impl(k, q):
            s = np.float32(0.0)
            for i in range(q.shape[0]):
                s += bf16_to_f32(k[i]) * q[i]
            return s

        return impl

    def impl(k, q):
        s = np.float32(0.0)
        for i in range(q.shape[0]):
            s += k[i] * q[i]
        return s

    return impl


@overload(as_f32, inline="always")
def _as_f32(rows, n, scratch):
    if rows.dtype == types.float32:
        return lambda rows, n, scratch: rows
    if rows.dtype == types.uint16:
        def impl(rows, n, scratch):
            for i in range(n):
                scratch[i] = bf16_to_f32(rows[i])
            return scratch

        return impl
    return None
