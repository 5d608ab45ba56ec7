"""Every message between the runtime and the indexer process, and how it travels.

A message is one ZeroMQ multipart message: frame 0 is a msgpack header (msgspec, never pickle) and the
frames after it are raw C-order numeric arrays, each described in the header by an :class:`ArraySpec`
(name, dtype, shape). The client's DEALER socket sends ``[header, *arrays]``; the server's ROUTER socket
sees ``[peer, header, *arrays]`` and answers with ``[peer, reply_header, *arrays]``.

Every header carries the protocol version ``v`` and a request id chosen by the client; the reply carries
the same id, so replies to pipelined requests can come back in any order. The server decodes ``(v, id)``
first and answers a version mismatch, an undecodable header, an unknown op, a bad array frame or an
out-of-range value with an error reply (``ok=False``, a ``code`` and a readable ``error``) and keeps
serving.

Keys never travel here: they live in the shared key store (:mod:`.keystore`); ``slots`` name rows of it.
"""

from __future__ import annotations

import msgspec
import numpy as np

from ..index.config import DEFAULT_PROP_TO_RETRIEVE

PROTOCOL_VERSION = 1

#: the largest message the server accepts (ZeroMQ drops larger ones before they reach Python)
MAX_MESSAGE_BYTES = 1 << 30

#: dtype names allowed on the wire; "bfloat16" travels as raw 16-bit words (numpy has no bfloat16)
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32,
               "int64": np.int64}

#: how many frames may follow a header, and how many dimensions an array may have
MAX_ARRAYS = 8
MAX_NDIM = 6


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``code`` says which kind of problem it is."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ArraySpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------- requests
class Ping(msgspec.Struct, tag=True, frozen=True):
    """Liveness and identity; the reply is a :class:`Pong`."""


class Build(msgspec.Struct, tag=True, frozen=True):
    """(Re)build ``seq``'s index for each of ``layers`` from scratch over the tokens whose key-store slots
    are in the array ``slots`` [n] (int32, position order). A sequence is created by its first Build,
    Insert or Share."""

    seq: int
    layers: list[int]


class Insert(Build, tag=True, frozen=True):
    """Append the tokens at ``slots`` [n] to ``seq``'s index for each of ``layers`` (decode inserts, later
    prefill chunks, a turn's new tokens after a prefix share). Builds the layer if it has no index yet."""


class Query(msgspec.Struct, tag=True, frozen=True):
    """Select pages for one decode batch at one layer. Array ``q`` [B, H_q, d] (float32/float16/bfloat16)
    holds every query head of each of the B sequences in ``seqs``. The reply holds ``pages`` [B, H_kv, P]
    (int32, best first, -1 padded) and, unless ``want_slots`` is false, ``slots`` [B, H_kv, P, C] (int32,
    the key-store slots of each page's tokens, -1 padded). ``policy`` picks the selection: ``icecache`` (the
    index's search) or a baseline over the same tokens (``indexer/baselines.py``). ``merge``: how the query heads
    of a KV head share its pages (``index/gqa_merge.py``: ``rank`` or ``mass``; streaming ignores it)."""

    layer: int
    seqs: list[int]
    n_pages: int
    fov: int | None = None
    prop_to_retrieve: float = DEFAULT_PROP_TO_RETRIEVE
    num_to_retrieve: int = 0
    want_slots: bool = True
    policy: str = "icecache"
    merge: str = "rank"
    #: ``time.monotonic()`` (CLOCK_MONOTONIC, shared by the processes of one host) after which nobody waits
    #: for the answer: the indexer skips the search and replies ``expired``, so a backlog queued while it
    #: was stopped or slow costs nothing once it runs again
    expires_at: float | None = None


class Share(msgspec.Struct, tag=True, frozen=True):
    """Give ``dst`` (new) the index of the first ``prefix_len`` tokens of ``src`` for every layer ``src``
    has: a radix-cache hit. Nothing is re-indexed when ``prefix_len`` covers the source layer (the two
    sequences share it copy-on-write); a shorter prefix copies and trims."""

    src: int
    dst: int
    prefix_len: int


class Release(msgspec.Struct, tag=True, frozen=True):
    """Forget ``seqs`` (unknown ids are ignored: release is idempotent)."""

    seqs: list[int]


class Reset(msgspec.Struct, tag=True, frozen=True):
    """Forget every sequence (SGLang's ``flush_cache``)."""


class Stats(msgspec.Struct, tag=True, frozen=True):
    """Counters and sizes; the reply is a :class:`StatsResult`."""


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """Reply, then exit cleanly."""


Op = Ping | Build | Insert | Query | Share | Release | Reset | Stats | Shutdown


class Head(msgspec.Struct):
    """What every header starts with; decoded first so a version mismatch is reported as one."""

    v: int
    id: int


class Request(msgspec.Struct):
    v: int
    id: int
    op: Op
    arrays: list[ArraySpec] = []


# ---------------------------------------------------------------------------------------------- replies
class Pong(msgspec.Struct, tag=True):
    pid: int
    rank: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_slots: int


class Done(msgspec.Struct, tag=True):
    """Acknowledges Build / Insert / Share / Release / Reset / Shutdown; ``tokens`` is the sequence's token
    count per layer touched (Build/Insert/Share) or the number of sequences dropped (Release/Reset)."""

    tokens: list[int] = []


class QueryResult(msgspec.Struct, tag=True):
    n_tokens: list[int]  # indexed tokens of each sequence at this layer
    search_us: float  # time spent in the search itself


class StatsResult(msgspec.Struct, tag=True):
    sequences: int  # live sequence ids
    layer_entries: int  # (sequence, layer) pairs with an index
    indexes: int  # distinct index objects (shared entries count once)
    shared_entries: int  # entries whose index is shared with another sequence
    tokens: int  # indexed tokens summed over distinct indexes and layers
    index_bytes: int  # memory held by distinct indexes
    state_slots: int  # indexes registered for batched search (equals ``indexes`` when nothing leaks)
    requests: int
    errors: int
    builds: int
    inserts: int
    queries: int
    query_rows: int  # sequences queried, summed over query messages
    shares: int
    copies: int  # copy-on-write copies made
    trims: int  # shares that removed a source tail
    rebuilds: int  # index-internal growth rebuilds
    query_us_total: float
    busy_us_total: float
    indexed_tokens: int = 0  # tokens received by Build/Insert, summed over layers (shares index nothing)
    expired: int = 0  # queries skipped because their ``expires_at`` had passed
    numba_threads: int = 0  # numba threads of the search and the writes (each write worker gets a share)
    blas_threads: int = 0  # OpenBLAS threads of the process (0: no OpenBLAS found; ``indexer/blas.py``)
    lowrank_rows: int = 0  # sequences' queries answered through the low-rank first pass (``selection: lowrank``)
    lowrank_indexes: int = 0  # indexes whose low-rank codes are fitted (``index/lowrank.py``)
    nonfinite_queries: int = 0  # sequences' queries with a non-finite value (answered with their recent pages)
    lowrank_bytes: int = 0  # of index_bytes: the low-rank codes, maps and query moments


Result = Pong | Done | QueryResult | StatsResult


class Reply(msgspec.Struct):
    v: int
    id: int
    ok: bool
    result: Result | None = None
    code: str = ""
    error: str = ""
    arrays: list[ArraySpec] = []


# ---------------------------------------------------------------------------------------------- codecs
_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(Head)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


_NP_DTYPES = {k: np.dtype(v) for k, v in WIRE_DTYPES.items()}


def _spec_of(name: str, a: np.ndarray, dtype: str | None) -> ArraySpec:
    if dtype is None:
        dtype = a.dtype.name
    if _NP_DTYPES.get(dtype) != a.dtype:
        raise ProtocolError("bad_array", f"array {name!r}: dtype {a.dtype} cannot travel as {dtype!r}")
    return ArraySpec(name, dtype, tuple(int(s) for s in a.shape))


def pack_arrays(arrays: dict) -> tuple[list[ArraySpec], list]:
    """``{name: ndarray | (ndarray, wire dtype)}`` -> (specs, frames); frames are zero-copy buffers."""
    specs, frames = [], []
    for name, a in arrays.items():
        dtype = None
        if isinstance(a, tuple):
            a, dtype = a
        a = np.ascontiguousarray(a)
        specs.append(_spec_of(name, a, dtype))
        frames.append(memoryview(a).cast("B") if a.size else b"")
    return specs, frames


def encode_request(rid: int, op, arrays: dict | None = None) -> list:
    specs, frames = pack_arrays(arrays or {})
    return [_encoder.encode(Request(PROTOCOL_VERSION, rid, op, specs))] + frames


def encode_reply(rid: int, result=None, arrays: dict | None = None) -> list:
    specs, frames = pack_arrays(arrays or {})
    return [_encoder.encode(Reply(PROTOCOL_VERSION, rid, True, result, arrays=specs))] + frames


def encode_error(rid: int, code: str, error: str) -> list:
    return [_encoder.encode(Reply(PROTOCOL_VERSION, rid, False, None, code=code, error=error[:2000]))]


def unpack_arrays(specs: list[ArraySpec], frames: list) -> dict[str, np.ndarray]:
    """Check every frame against its spec (count, dtype, size) and view it as an array (no copy)."""
    if len(specs) > MAX_ARRAYS:
        raise ProtocolError("bad_array", f"at most {MAX_ARRAYS} arrays per message, got {len(specs)}")
    if len(frames) != len(specs):
        raise ProtocolError("bad_array", f"header describes {len(specs)} array frame(s), {len(frames)} arrived")
    out = {}
    for spec, frame in zip(specs, frames):
        if spec.dtype not in WIRE_DTYPES:
            raise ProtocolError("bad_array", f"array {spec.name!r}: dtype {spec.dtype!r} is not one of "
                                f"{sorted(WIRE_DTYPES)}")
        if len(spec.shape) > MAX_NDIM or any(s < 0 for s in spec.shape):
            raise ProtocolError("bad_array", f"array {spec.name!r}: invalid shape {spec.shape}")
        dt = _NP_DTYPES[spec.dtype]
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        need = int(np.prod(spec.shape, dtype=np.int64)) * dt.itemsize
        if buf.nbytes != need:
            raise ProtocolError("bad_array", f"array {spec.name!r}: {spec.dtype}{list(spec.shape)} needs {need} "
                                f"bytes, its frame has {buf.nbytes}")
        if spec.name in out:
            raise ProtocolError("bad_array", f"array {spec.name!r} appears twice")
        out[spec.name] = np.frombuffer(buf, dtype=dt).reshape(spec.shape) if need else np.empty(spec.shape, dt)
    return out


def as_received(rid: int, op, arrays: dict | None = None) -> tuple[Request, dict[str, np.ndarray]]:
    """A request as the indexer receives it: encoded, copied into frames and decoded, so its arrays are the
    read-only frame views a socket gives (numba compiles per array type). For answering in process."""
    return decode_request([bytes(f) for f in encode_request(rid, op, arrays)])


def decode_request(frames: list) -> tuple[Request, dict[str, np.ndarray]]:
    """frames = ``[header, *arrays]`` -> (request, arrays). Raises :class:`ProtocolError`; its ``rid``
    attribute is the request id when the header got that far (else -1)."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    header = _frame_bytes(frames[0])
    try:
        head = _head_decoder.decode(header)
    except Exception as e:  # noqa: BLE001 - DecodeError, ValidationError, UnicodeDecodeError on bad strings, ...
        raise _with_rid(ProtocolError("malformed", f"undecodable header: {e}"), -1) from None
    if head.v != PROTOCOL_VERSION:
        raise _with_rid(ProtocolError("version", f"protocol version {head.v} is not supported; this indexer "
                                      f"speaks version {PROTOCOL_VERSION}"), head.id)
    try:
        req = _request_decoder.decode(header)
    except msgspec.ValidationError as e:
        raise _with_rid(ProtocolError("bad_request", f"invalid request: {e}"), head.id) from None
    except Exception as e:  # noqa: BLE001 - as above
        raise _with_rid(ProtocolError("malformed", f"undecodable header: {e}"), head.id) from None
    try:
        arrays = unpack_arrays(req.arrays, frames[1:])
    except ProtocolError as e:
        raise _with_rid(e, head.id) from None
    return req, arrays


def decode_reply(frames: list) -> tuple[Reply, dict[str, np.ndarray]]:
    rep = _reply_decoder.decode(_frame_bytes(frames[0]))
    return rep, unpack_arrays(rep.arrays, frames[1:])


def _frame_bytes(frame):
    return frame.bytes if hasattr(frame, "bytes") else frame


def _with_rid(err: ProtocolError, rid: int) -> ProtocolError:
    err.rid = rid
    return err


def bfloat16_to_float32(words: np.ndarray) -> np.ndarray:
    """Raw bfloat16 words (uint16) -> float32 (exact: bfloat16 is the top half of a float32)."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def as_float32(a: np.ndarray, wire_dtype: str) -> np.ndarray:
    if wire_dtype == "bfloat16":
        return bfloat16_to_float32(a)
    return np.asarray(a, dtype=np.float32)
