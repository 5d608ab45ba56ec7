"""How the index stores key rows: float32, bfloat16 bits in uint16 (half the bytes, the dtype most models'
KV cache has), or int8 (a quarter: a row's ``d`` values over its own scale). Scores always accumulate in
float32.

numba has no 16-bit float type, so a bfloat16 value is kept as the upper 16 bits of its float32 pattern and
widened in registers (``bf16_to_f32``: zero-extend, shift, bitcast; vectorised by LLVM).

An int8 row is ``d + 4`` bytes: ``d`` values ``k8`` in [-127, 127], then its float32 scale ``s = max|k| / 127``
(little-endian bytes), so a row moves through the page table as one unit. An int8 index first divides its
keys by per-channel scales (``channel_scales``, fixed at a build) and multiplies its queries by them, so
scores are unchanged and an outlier channel does not coarsen every other channel of the row. Its value is ``float32(k8) * s``,
rounded once, the same in NumPy (``from_storage``) and in the tree search's kernels (``key_dot``,
``key_row``): there an int8 index is exactly a float32 index over those values, as a bfloat16 one is over the
rounded keys. The scans (``scan.py``) multiply a row's dot product by its scale instead, ``(sum k8 q) s``,
which differs from ``sum (k8 s) q`` in the last bits. It is an approximate copy (an error of at most ``s / 2``
per value); the exact selection rescores its best candidates from the key store (``scan.rescore_pages``).

``key_dot`` takes a key row of any storage dtype, ``key_row`` turns one stored row into float32 values, and
``stored_value`` / ``stored_row_width`` / ``stored_row_factor`` let a scan widen each stored value as it
multiplies it, so every kernel compiles one specialization per dtype.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

#: the ``key_dtype`` values an index accepts -> the NumPy dtype of its ``page_keys``
STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}
#: bytes an int8 row carries after its values: its float32 scale
INT8_SCALE_BYTES = 4
#: below this many values the conversions (and ``transform.key_projection``) run on one thread: waking numba's
#: pool for a decode insert's few rows cost more than the work (2-5 ms per call next to a 128k-token index on
#: 2 cores, index_speed.py)
PARALLEL_MIN = 1 << 16


#: a channel's scale is at least this share of its head's largest channel scale (no division blow-up)
CHANNEL_SCALE_FLOOR = 1e-3
#: channel scales are fitted over at least this many tokens; a smaller build keeps scales of 1 (each row
#: over its own scale only) until a rebuild holds enough: a few tokens' channel maxima would make later
#: keys' other channels round to 0
CHANNEL_FIT_MIN_TOKENS = 256


def channel_scales(K: np.ndarray) -> np.ndarray:
    """Per KV head and channel, the scale an int8 index divides keys ``K [H, n, d]`` by before quantizing
    each row: the channel's largest magnitude (floored at ``CHANNEL_SCALE_FLOOR`` of the head's largest),
    1 for an all-zero head or fewer than ``CHANNEL_FIT_MIN_TOKENS`` tokens -> ``[H, d]`` float32. With it, a model's outlier channels (Qwen2's keys have
    channels tens of times larger than the rest) no longer set every row's quantization step."""
    H, d = K.shape[0], K.shape[-1]
    if K.shape[1] < CHANNEL_FIT_MIN_TOKENS:
        return np.ones((H, d), np.float32)
    m = np.zeros((H, d), np.float32)
    _channel_absmax(np.ascontiguousarray(K, dtype=np.float32), m)  # [H, d]; keys reach here NaN-free (_as_float_array)
    top = m.max(axis=1, keepdims=True)
    c = np.maximum(m, np.float32(CHANNEL_SCALE_FLOOR) * top)
    return np.where(top > 0, c, np.float32(1.0)).astype(np.float32)


@njit(cache=True, nogil=True, parallel=True)
def _channel_absmax(K, m):
    """``m[h, j] = max_i |K[h, i, j]|`` (one pass over the keys; parallel over heads)."""
    for h in prange(K.shape[0]):
        for i in range(K.shape[1]):
            for j in range(K.shape[2]):
                m[h, j] = max(m[h, j], abs(K[h, i, j]))


def scaled_int8(K: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An int8 index's rows for keys ``K [H, n, d]`` over channel scales ``scale [H, d]``, and the float32
    keys those rows stand for: bit for bit ``to_storage(K / scale, "int8")`` and ``kept_keys(K, "int8",
    scale)``, in one parallel pass instead of five NumPy passes with their temporaries (1.8 of a 128k
    layer's 5 build seconds on 2 cores)."""
    K = np.ascontiguousarray(K, dtype=np.float32)
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    H, n, d = K.shape
    stored = np.empty((H, n, d + INT8_SCALE_BYTES), np.int8)
    kept = np.empty((H, n, d), np.float32)
    if K.size and not (_scaled_rows if K.size >= PARALLEL_MIN else _scaled_rows_serial)(K, scale, stored, kept):
        raise ValueError("int8 keys must be finite")
    return stored, kept


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")  # a zero scale: not finite, not ZeroDivisionError
def _scaled_rows(K, scale, stored, kept):
    n = K.shape[1]
    bad = 0
    for r in prange(K.shape[0] * n):
        bad += _scaled_one(K, scale, stored, kept, r // n, r % n)
    return bad == 0


@njit(cache=True, nogil=True, error_model="numpy")
def _scaled_rows_serial(K, scale, stored, kept):
    n = K.shape[1]
    bad = 0
    for r in range(K.shape[0] * n):
        bad += _scaled_one(K, scale, stored, kept, r // n, r % n)
    return bad == 0


@njit(cache=True, nogil=True, inline="always")
def _scaled_one(K, scale, stored, kept, h, i):
    """Row (h, i): ``y = K / scale`` (float32, held in ``kept`` meanwhile), quantized as ``_quantize_one``
    does, then ``float32(k8) * s * scale`` (two float32 roundings, as ``from_storage`` and the multiplication
    back). Returns 1 for a row with a value that is not finite."""
    d = K.shape[2]
    m = np.float32(0.0)
    bad = 0
    for j in range(d):
        y = K[h, i, j] / scale[h, j]
        if not np.isfinite(y):
            bad = 1
        m = max(m, abs(y))
        kept[h, i, j] = y
    s = m / np.float32(127.0)
    for j in range(d):
        q = _int8_of(kept[h, i, j], s)
        stored[h, i, j] = q
        kept[h, i, j] = (np.float32(q) * s) * scale[h, j]
    _put_scale(stored[h, i], d, s)
    return bad


@njit(cache=True, nogil=True, inline="always")
def _int8_of(y, s):
    """``rint(y / s)`` (ties to even) clipped to [-127, 127]; 0 for a zero scale."""
    return np.int8(min(max(np.rint(y / s), np.float32(-127.0)), np.float32(127.0))) if s > 0 else np.int8(0)


@njit(cache=True, nogil=True, inline="always")
def _put_scale(row, d, s):
    """An int8 row's float32 scale ``s`` as its four little-endian bytes after the ``d`` values."""
    u = f32_as_u32(s)
    for b in range(4):
        row[d + b] = np.int8(np.uint8((u >> np.uint32(8 * b)) & np.uint32(0xFF)))


def stored_width(d: int, key_dtype: str) -> int:
    """Elements of one stored key row of dimension ``d``."""
    return d + INT8_SCALE_BYTES if key_dtype == "int8" else d


def to_storage(keys: np.ndarray, key_dtype: str) -> np.ndarray:
    """float32 keys ``[..., d]`` -> the storage dtype (bfloat16: round to nearest, ties to even, as torch does;
    int8: ``[..., d + 4]``, each row over its own scale)."""
    k = np.ascontiguousarray(keys, dtype=np.float32)
    if key_dtype == "float32":
        return k
    if key_dtype == "int8":
        return _quantize_int8(k)
    out = np.empty(k.shape, np.uint16)
    (_round_bf16 if k.size >= PARALLEL_MIN else _round_bf16_serial)(k.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


def _quantize_int8(k: np.ndarray) -> np.ndarray:
    d = k.shape[-1]
    rows = k.reshape(-1, d)
    if not np.isfinite(rows).all():
        raise ValueError("int8 keys must be finite")
    out = np.empty((rows.shape[0], d + INT8_SCALE_BYTES), np.int8)
    (_quantize_rows if rows.size >= PARALLEL_MIN else _quantize_rows_serial)(rows, out)
    return out.reshape(k.shape[:-1] + (d + INT8_SCALE_BYTES,))


@njit(cache=True, nogil=True, parallel=True)
def _quantize_rows(rows, out):
    for r in prange(rows.shape[0]):
        _quantize_one(rows, out, r)


@njit(cache=True, nogil=True)
def _quantize_rows_serial(rows, out):
    for r in range(rows.shape[0]):
        _quantize_one(rows, out, r)


@njit(cache=True, nogil=True, inline="always")
def _quantize_one(rows, out, r):
    """Row ``r``: scale ``max|k| / 127`` (float32), values ``rint(k / scale)`` (ties to even), then the scale's
    four little-endian bytes."""
    d = rows.shape[1]
    m = np.float32(0.0)
    for i in range(d):
        m = max(m, abs(rows[r, i]))
    s = m / np.float32(127.0)
    for i in range(d):
        out[r, i] = _int8_of(rows[r, i], s)
    _put_scale(out[r], d, s)


def int8_scales(stored: np.ndarray) -> np.ndarray:
    """The float32 scale of every int8 row ``[..., d + 4]`` -> ``[...]``."""
    tail = np.ascontiguousarray(stored[..., -INT8_SCALE_BYTES:])
    return tail.view("<f4")[..., 0].astype(np.float32)


def from_storage(stored: np.ndarray) -> np.ndarray:
    """Stored key rows -> float32 (exact for bfloat16: every bfloat16 value is a float32 value; an int8 row
    gives ``float32(k8) * scale``, its ``d`` values)."""
    if stored.dtype == np.int8:
        vals = stored[..., :-INT8_SCALE_BYTES].astype(np.float32)
        return np.ascontiguousarray(vals * int8_scales(stored)[..., None], dtype=np.float32)
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
    """The float32 values stored rows of ``key_dtype`` stand for (an int8 row: over its own scale only)."""
    return from_storage(to_storage(keys, key_dtype))


def kept_keys(keys: np.ndarray, key_dtype: str, key_scale: np.ndarray | None = None) -> np.ndarray:
    """The float32 keys an index with ``key_dtype`` keeps for ``keys [H, n, d]`` (what a reference must use):
    rounded (bfloat16), or divided by the channel scales ``key_scale [H, d]``, quantized and multiplied back
    (int8; default: the scales a build over ``keys`` fits)."""
    if key_dtype != "int8":
        return round_keys(keys, key_dtype)
    k = np.ascontiguousarray(keys, dtype=np.float32)
    c = channel_scales(k) if key_scale is None else np.asarray(key_scale, np.float32)
    q = from_storage(to_storage(np.ascontiguousarray(k / c[:, None, :], dtype=np.float32), "int8"))
    return np.ascontiguousarray(q * c[:, None, :], dtype=np.float32)


@intrinsic
def bf16_to_f32(typingctx, x):
    """uint16 bfloat16 bits -> float32 (numba)."""
    if x == types.uint16:
        def codegen(context, builder, sig, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen
    return None


@intrinsic
def f32_as_u32(typingctx, x):
    """float32 -> its uint32 bits (numba)."""
    if x == types.float32:
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen
    return None


@intrinsic
def u32_as_f32(typingctx, x):
    """uint32 bits -> float32 (numba)."""
    if x == types.uint32:
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen
    return None


def key_dot(k, q):
    """``<k, q>`` in float32 for a stored key row ``k`` (float32, bfloat16 bits or int8 with its scale) and a
    float32 ``q`` of the key dimension."""
    raise NotImplementedError("numba only")


def row_scale(k, d):
    """The float32 scale of an int8 row ``k`` whose values are ``k[:d]`` (numba)."""
    raise NotImplementedError("numba only")


def key_row(k, d, scratch):
    """One stored key row as ``d`` float32 values (numba): ``k`` itself when float32, else into ``scratch``."""
    raise NotImplementedError("numba only")


def key_dim(k):
    """The key dimension of one stored row (numba): its length, less the scale bytes of an int8 row."""
    raise NotImplementedError("numba only")


@overload(row_scale, inline="always")
def _row_scale(k, d):
    def impl(k, d):
        u = np.uint32(np.uint32(np.uint8(k[d])) | (np.uint32(np.uint8(k[d + 1])) << np.uint32(8))
                      | (np.uint32(np.uint8(k[d + 2])) << np.uint32(16))
                      | (np.uint32(np.uint8(k[d + 3])) << np.uint32(24)))
        return u32_as_f32(u)

    return impl


@overload(key_dim, inline="always")
def _key_dim(k):
    if k.dtype == types.int8:
        return lambda k: k.shape[0] - 4
    return lambda k: k.shape[0]


@overload(key_row, inline="always")
def _key_row(k, d, scratch):
    if k.dtype == types.float32:
        return lambda k, d, scratch: k
    if k.dtype == types.uint16:
        def impl(k, d, scratch):
            for i in range(d):
                scratch[i] = bf16_to_f32(k[i])
            return scratch

        return impl
    if k.dtype == types.int8:
        def impl(k, d, scratch):
            s = row_scale(k, d)
            for i in range(d):
                scratch[i] = np.float32(k[i]) * s
            return scratch

        return impl
    return None


def as_f32(rows, n, scratch):
    """The first ``n`` values of flat stored rows as float32 (numba): ``rows`` itself when it is float32,
    else widened into the float32 ``scratch`` (no copy on the float32 path)."""
    raise NotImplementedError("numba only")


@overload(key_dot, jit_options={"fastmath": True})
def _key_dot(k, q):
    if k.dtype == types.int8:
        def impl(k, q):
            d = q.shape[0]
            sc = row_scale(k, d)
            s = np.float32(0.0)
            for i in range(d):
                s += (np.float32(k[i]) * sc) * q[i]
            return s

        return impl
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


def stored_value(rows, o):
    """Value ``o`` of flat stored rows as float32, before an int8 row's scale (numba): widened in registers, so
    a scan reads the stored bytes once instead of writing and reading a float32 copy."""
    raise NotImplementedError("numba only")


def stored_row_width(rows, d):
    """Entries per stored row of key dimension ``d`` in ``rows`` (numba): an int8 row carries its scale bytes."""
    raise NotImplementedError("numba only")


def stored_row_factor(rows, o, d):
    """What a dot product with the ``d`` values of the stored row starting at ``o`` is multiplied by (numba): an
    int8 row's scale, else 1."""
    raise NotImplementedError("numba only")


@overload(stored_value, inline="always")
def _stored_value(rows, o):
    if rows.dtype == types.float32:
        return lambda rows, o: rows[o]
    if rows.dtype == types.uint16:
        return lambda rows, o: bf16_to_f32(rows[o])
    if rows.dtype == types.int8:
        return lambda rows, o: np.float32(rows[o])
    return None


@overload(stored_row_width, inline="always")
def _stored_row_width(rows, d):
    if rows.dtype == types.int8:
        return lambda rows, d: d + INT8_SCALE_BYTES
    return lambda rows, d: d


@overload(stored_row_factor, inline="always")
def _stored_row_factor(rows, o, d):
    if rows.dtype == types.int8:
        return lambda rows, o, d: row_scale(rows, o + d)
    return lambda rows, o, d: np.float32(1.0)
