"""Prefill from the host pool: each layer's attention reads a staging buffer on the device, not SGLang's pool.

With ``offload`` SGLang's KV pool is host memory (``kv_pool.py``; on a GPU, pinned) and the device holds no
layer's full KV. A prefill chunk's new tokens must still attend to their prefix (the earlier chunks of a
long prompt, or a radix-cache hit) and to themselves, densely, on SGLang's own backend. So, per extend
forward pass, the backend stages the batch one layer at a time (as SGLang's HiCache loads host KV back
layer by layer):

- ``begin`` (once per pass): the batch's rows are laid out back to back in a staging buffer, request ``i``
  at rows ``[base_i, base_i + seq_len_i)``: its prefix's host slots are gathered there, its new tokens are
  written there. A staging ``req_to_token`` (rows ``0 .. bs - 1``) maps each position to its staging row;
  the dense backend was built over that table and over :class:`StagedKV` (``dense.py``), and receives a
  copy of the forward batch that names the staging rows (:attr:`StagedPrefill.batch`).
- ``load`` (per layer, before its attention): the prefix rows of every request, host pool -> staging, one
  gather for K and one for V (on a GPU a Triton kernel reads the pinned host rows directly,
  ``kernels/row_copy.py``).
- the dense backend writes the new tokens' K/V into the staging rows and attends; the backend also writes
  them into SGLang's pool at their real slots (``IceCacheKVPool._store_kv_layer``, across PCIe on a GPU).

The staging buffer holds one layer of the batch's tokens (prefix and new). It is allocated at launch with
``prefill_staging_tokens`` rows (default: SGLang's request-row width, the context length and a few rows, so
any one request fits; a 1M-token context costs its rows even when no request is that long: lower
``--context-length``) and SGLang's
prefill admission keeps every extend batch within it (``patches/admission.py``: a request that would not fit
waits for the next batch; the batch's first request always runs): device memory for prefill is fixed, not
the sum of a batch's contexts (32 requests on a 128k prefix each would have asked for 4M rows, 16 GiB at
Llama-3.1-8B's shape, inside a forward pass). A chunk re-reads its whole prefix at
every layer: a prompt in ``n`` chunks moves ``(n - 1) / 2`` times its KV host -> device over its prefill
(computed: 7.5x for 128k tokens in 8k chunks, 120 GiB at Llama-3.1-8B's shape, 2.5-5 s at 25-50 GB/s), the
price of a device that does not hold the prompt; at that shape a 131072-token request needs a 0.5 GiB
staging buffer and 16 GiB of host pool (computed), so the model's context length, not the device, bounds a
single request.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

from ..config import IceCacheConfigError

logger = logging.getLogger(__name__)

#: this process's staging rows (``PrefillStaging``): what SGLang's prefill admission keeps an extend batch within
_rows_limit: int | None = None
#: times SGLang's prefill admission held a request back to a later batch for the staging buffer, in this process
_deferred = 0


def rows_limit() -> int | None:
    """The staging rows an extend batch must fit (None: no staging in this process, no limit)."""
    return _rows_limit


def batch_fits(staged_rows: int, candidate_rows: int) -> bool:
    """Whether a request of ``candidate_rows`` (its prefix and new tokens) joins an extend batch already staging
    ``staged_rows`` (``patches/admission.py``); counts each time one is held back. A batch's first request
    always runs (the buffer holds the longest request SGLang admits)."""
    global _deferred
    if _rows_limit is None or staged_rows == 0 or staged_rows + candidate_rows <= _rows_limit:
        return True
    _deferred += 1
    return False


def admission_deferrals() -> int:
    return _deferred


def staging_rows(prefill_staging_tokens: int | None, longest: int) -> int:
    """The staging buffer's rows: ``prefill_staging_tokens``, or ``longest`` (the most tokens one request holds,
    SGLang's ``req_to_token`` width), which it may not be below: every request must fit alone."""
    rows = prefill_staging_tokens or longest
    if rows < longest:
        raise IceCacheConfigError(
            f"prefill_staging_tokens ({rows}) cannot stage one request of the context length: the smallest working "
            f"size is {longest} (or lower --context-length)")
    return rows


class StagedKV:
    """The KV pool a dense backend sees under offload: one layer's staging rows on the device, the same
    buffers for every layer id (layers run one after another). Anything else is the real pool's."""

    def __init__(self, pool, device: torch.device):
        self._pool = pool
        self.device = torch.device(device)
        H, d = pool.head_num, pool.head_dim
        v_d = getattr(pool, "v_head_dim", d)
        # a minimal buffer until the first prefill (backends read a buffer's shape when they are built)
        self.k = torch.zeros(1, H, d, dtype=pool.store_dtype, device=self.device)
        self.v = torch.zeros(1, H, v_d, dtype=pool.store_dtype, device=self.device)
        self.nbytes_max = 0

    def __getattr__(self, name):  # dtype, head_num, layer_num, ...: the real pool's
        if name.startswith("_"):  # not built yet (copy, pickle): no recursion through ``_pool``
            raise AttributeError(name)
        return getattr(self._pool, name)

    def resize(self, rows: int) -> None:
        """At least ``rows`` staging rows (grown, never shrunk: one allocation for prompts of one size)."""
        if self.k.shape[0] < rows:
            self.k = self.k.new_empty((rows, *self.k.shape[1:]))
            self.v = self.v.new_empty((rows, *self.v.shape[1:]))
            self.nbytes_max = max(self.nbytes_max, self.nbytes)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None, **_kw) -> None:
        loc = unwrap_write_loc(loc_info)[0]
        dt = self.k.dtype
        self.k[loc] = cache_k.reshape(-1, *self.k.shape[1:]).to(dt)
        self.v[loc] = cache_v.reshape(-1, *self.v.shape[1:]).to(dt)


class StagedReqToToken:
    """The ``req_to_token`` pool a dense backend sees under offload: request ``i`` of the batch in row ``i``,
    its positions mapped to its staging rows (filled per pass by :meth:`PrefillStaging.begin`)."""

    def __init__(self, like: torch.Tensor, size: int):
        self.req_to_token = torch.zeros_like(like)
        self.size = size
        self.max_context_len = like.shape[1]
        self.device = like.device


class RunnerView:
    """The model runner a dense backend is built from under offload: SGLang's, with the staging pools and a
    KV index translator over the staging table (SGLang's Triton and FlashInfer backends build their read
    indices from the translator's table, not from ``req_to_token_pool``)."""

    def __init__(self, runner, req_to_token_pool: StagedReqToToken, token_to_kv_pool: StagedKV):
        self._runner = runner
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.kv_index_translator = staged_translator(runner, req_to_token_pool, token_to_kv_pool)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._runner, name)


def staged_translator(runner, table: StagedReqToToken, kv: StagedKV):
    """SGLang's KV index translator over the staging table: token ids are staging rows, nothing to translate
    (no unified or draft pool under IceCache). None for a runner without one."""
    if getattr(runner, "kv_index_translator", None) is None:
        return None
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator

    return KVIndexTranslator(req_to_token=table.req_to_token, token_to_kv_pool_allocator=None,
                             token_to_kv_pool=kv, page_size=1, device=str(table.device))


@dataclass
class Gather:
    """Rows to copy host pool -> staging at each layer: host pool slots ``src`` to staging rows ``dst``, both
    on the staging device (a GPU reads the pinned host rows directly)."""

    src: torch.Tensor
    dst: torch.Tensor


@dataclass
class StagedPrefill:
    """One extend pass's staging: the batch the dense backend gets, and what each layer gathers."""

    batch: object  # the forward batch with staging rows (``req_pool_indices``, ``out_cache_loc``)
    prefix: Gather  # every request's prefix rows
    new: Gather  # the new tokens' rows (gathered only for a model that wrote its KV into the pool itself)
    rows: int  # staging rows in use


class PrefillStaging:
    """Stages an extend pass's KV, host pool -> device, one layer at a time (see the module docstring)."""

    def __init__(self, pool, req_to_token: torch.Tensor, device: torch.device | str, max_requests: int,
                 rows: int):
        global _rows_limit
        self.pool = pool
        self.device = torch.device(device)
        self.kv = StagedKV(pool, self.device)
        self.kv.resize(rows)  # at launch: device memory for prefill is fixed
        self.rows = _rows_limit = rows
        self.table = StagedReqToToken(req_to_token, max_requests)
        self.rows_gathered = 0  # (token, layer) rows gathered host -> staging since launch
        self._direct = False  # tests: the Triton gather (a GPU's read of pinned host rows) on the CPU's interpreter

    def runner_view(self, model_runner) -> RunnerView:
        return RunnerView(model_runner, self.table, self.kv)

    def begin(self, forward_batch, req_to_token: torch.Tensor) -> StagedPrefill:
        """Lay out an extend batch in the staging buffer; returns what its layers use."""
        rows = forward_batch.req_pool_indices.cpu().numpy()
        lens = _ints(forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens)
        prefixes = _ints(forward_batch.extend_prefix_lens_cpu if forward_batch.extend_prefix_lens_cpu is not None
                         else forward_batch.extend_prefix_lens)
        bs = len(rows)
        if bs > self.table.req_to_token.shape[0]:
            raise RuntimeError(f"an extend batch of {bs} requests exceeds the staging table's "
                               f"{self.table.req_to_token.shape[0]} rows")
        base = np.zeros(bs + 1, np.int64)
        np.cumsum(lens, out=base[1:])
        total = int(base[-1])
        if total > self.rows:  # admission keeps batches within the buffer (a hook that did not run: grow, not fail)
            logger.warning("IceCache: an extend batch stages %d rows, more than the %d prefill_staging_tokens; the "
                           "staging buffer grows", total, self.rows)
            self.rows = total
        self.kv.resize(max(total, 1))
        dev = self.table.device
        table = self.table.req_to_token
        src_parts, dst_parts, out_parts = [], [], []
        for i, (row, n, p) in enumerate(zip(rows, lens, prefixes)):
            staged = torch.arange(int(base[i]), int(base[i]) + n, dtype=table.dtype, device=dev)
            table[i, :n] = staged
            if p:
                src_parts.append(req_to_token[int(row), :p])
                dst_parts.append(staged[:p])
            out_parts.append(staged[p:])
        batch = copy.copy(forward_batch)
        batch.req_pool_indices = torch.arange(bs, dtype=forward_batch.req_pool_indices.dtype,
                                              device=forward_batch.req_pool_indices.device)
        batch.req_to_token_pool, batch.token_to_kv_pool = self.table, self.kv
        loc = forward_batch.out_cache_loc
        staged_loc = torch.cat(out_parts) if out_parts else loc[:0]
        batch.out_cache_loc = staged_loc.to(loc.dtype).to(loc.device)
        prefix = self._gather(torch.cat(src_parts) if src_parts else None,
                              torch.cat(dst_parts) if dst_parts else None)
        return StagedPrefill(batch, prefix, self._gather(loc, staged_loc), total)

    def _gather(self, src: torch.Tensor | None, dst: torch.Tensor | None) -> Gather:
        if src is None or src.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return Gather(empty, empty)
        return Gather(src.long().to(self.device), dst.long().to(self.device))

    def load(self, g: Gather, host_k: torch.Tensor, host_v: torch.Tensor) -> None:
        """One layer's rows ``g``, host pool -> staging (before its attention)."""
        n = g.dst.numel()
        if n == 0:
            return
        if host_k.device.type != self.device.type or self._direct:  # a GPU reading the pinned host pool directly
            from icecache_sglang.kernels import copy_rows

            for src, dst in ((host_k, self.kv.k), (host_v, self.kv.v)):
                copy_rows(src.view(src.shape[0], -1), dst.view(dst.shape[0], -1), g.src, g.dst)
        else:
            self.kv.k[g.dst] = host_k[g.src]
            self.kv.v[g.dst] = host_v[g.src]
        self.rows_gathered += n


def _ints(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.cpu().tolist()
    return [int(v) for v in x]
