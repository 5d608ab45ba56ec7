"""Malformed indexer messages, for the robustness tests and the fault benchmark (``benchmarks/faults.py``).

Every message is invalid in one way: random bytes, a valid Query header with flipped bytes, a truncated
header, a truncated or missing array frame, extra frames. None is a valid write: an indexer must answer
each with an error reply and keep serving.
"""

from __future__ import annotations

import numpy as np

from . import protocol as p


def fuzzed_messages(rng: np.random.Generator, n: int, head_dim: int, query_heads: int = 4) -> list[list[bytes]]:
    valid = p.encode_request(1, p.Query(layer=0, seqs=[-7], n_pages=4),
                             {"q": np.ones((1, query_heads, head_dim), np.float32)})
    header, frame = bytes(valid[0]), bytes(valid[1])
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # random bytes
            frames = [rng.bytes(int(rng.integers(0, 200)))]
        elif kind == 1:  # flipped bytes in a valid header
            h = bytearray(header)
            for j in rng.integers(0, len(h), 3):
                h[j] = int(rng.integers(0, 256))
            frames = [bytes(h), frame]
        elif kind == 2:  # truncated header
            frames = [header[: int(rng.integers(0, len(header)))]]
        elif kind == 3:  # truncated or missing array frame
            frames = [header, frame[: int(rng.integers(0, 64))]]
        else:  # extra garbage frames
            frames = [header, frame, rng.bytes(8)]
        out.append(frames)
    return out
