"""Triton kernels of the GPU path, installed as ``icecache_sglang.kernels``.

- :mod:`.row_copy`: move KV rows between planes by index lists: the scatter of the preload buffer into the
  device hot-page cache, and the direct (UVA) gather from pinned host memory.
- :mod:`.decode_index`: FlashInfer's token-level index arrays for one decode "sequence" per
  (request, KV head), from a :class:`~icecache_sglang.runtime.attention.DecodePlan` or from the hot-page
  cache's blocks.
- :mod:`.sparse_decode`: decode attention over those index lists with offsets on the device (split-KV, no
  host plan per layer): ``decode_attention: triton``.

Every kernel has a torch reference beside it (``*_reference``). On a machine without CUDA the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1`` is set on import when unset; ``INTERPRETED`` says this package
set it). That is how CI tests them.
"""

from __future__ import annotations

import os

import torch

# set by this package (not by the user): launchers drop it from the environment of servers they start
INTERPRETED = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it when kernels are defined and when they run

from .decode_index import (  # noqa: E402
    plan_indptr,
    plan_rows,
    plan_rows_reference,
    sparse_indptr,
    sparse_rows,
    sparse_rows_reference,
)
from .row_copy import copy_rows, copy_rows_reference  # noqa: E402
from .sparse_decode import sparse_decode, sparse_decode_reference  # noqa: E402


__all__ = [
    "copy_rows",
    "copy_rows_reference",
    "plan_indptr",
    "plan_rows",
    "plan_rows_reference",
    "sparse_indptr",
    "sparse_rows",
    "sparse_decode",
    "sparse_decode_reference",
    "sparse_rows_reference",
]
