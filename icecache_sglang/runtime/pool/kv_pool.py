"""SGLang's MHA KV pool, with the anchor layers' keys kept once, in memory the indexer maps.

IceCache's indexer process reads keys from a key store (``indexer.keystore.KeyStore``: a file in the
server's private ``/dev/shm`` directory, ``[anchor layers, slots, H_kv, d]``). A pool in host memory can
*be* that store: each anchor layer's K plane is a view of the store's layer, so the model's own KV write
is the write the indexer reads, and no second copy of the keys exists (before, the backend copied every
anchor layer's new keys from the pool into a separate store: one more host copy of every key).

SGLang builds the pool through ``SRTPlatform.get_kv_pool_cls(kind="mha")`` (hooked in ``patches/pool.py``
while IceCache is on) with the in-tree constructor's arguments; only ``_create_buffers_normal`` changes.
The shared planes need the plain NHD layout ``[slots, H, d]`` in host memory, unquantized: for any other
pool (a CUDA device pool, HND or page-major layouts, FP8) this class behaves exactly as the in-tree one
and the backend keeps copying keys into a store of its own.

**With offload on a GPU the pool is host memory too** (``host_resident``): every plane is a host tensor
registered with CUDA (pinned, exactly its size; the anchor K planes are the key store's memory), sized by
``host_kv_gb`` (``patches/pool.py``), while the pool's ``device`` stays the GPU for SGLang's bookkeeping.
Nothing reads it as device memory: prefill attends over rows staged to the device (``staging.py``),
decode over the device pool's lanes (``device_pool.py``), both gathered by a Triton kernel that reads the
pinned rows directly; the model's KV writes (``set_kv_buffer``) reach it the same way, a kernel writing the
rows across PCIe (:func:`write_rows`), in stream order with the reads after them. The indexer reads the
keys from the host: ``host_writes_pending`` tells the backend to wait for the stream before it sends an
index write.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ...indexer.keystore import KeyStore, PrivateDir
from ..config import IceCacheConfig, IceCacheConfigError

logger = logging.getLogger(__name__)

#: the KV dtypes a key store can hold, by their names (the backend checks a pool's dtype against it too)
KEY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class IceCacheKVPool(MHATokenToKVPool):
    #: the key store whose layers are this pool's anchor K planes (None: the in-tree buffers)
    key_store: KeyStore | None = None
    private_dir: PrivateDir | None = None
    anchors: list[int] = []
    #: offload on a GPU: the planes are host memory while the model runs on the device
    host_resident: bool = False

    @property
    def host_writes_pending(self) -> bool:
        """Whether KV writes reach host memory asynchronously (a GPU writing the host pool): the indexer
        may read a key only after the stream that wrote it has run."""
        return self.host_resident

    def _shared_keys_problem(self) -> str:
        """Why this pool cannot hold its keys in a shared store ('' when it can)."""
        if torch.device(self.device).type != "cpu" and not self.host_resident:
            return f"the pool is on {self.device} (device memory)"
        return self._host_layout_problem()

    def _host_layout_problem(self) -> str:
        """Why this pool's planes cannot be plain host tensors ('' when they can)."""
        if self.store_dtype not in KEY_DTYPES or self.store_dtype != self.dtype:
            return f"KV dtype {self.dtype} stored as {self.store_dtype}"
        if getattr(self, "kv_cache_layout", "nhd") != "nhd" or getattr(self, "use_hnd", False):
            return f"KV layout {getattr(self, 'kv_cache_layout', '?')}"
        if self.post_capture_active:
            return "post-capture KV backing"
        if (getattr(self, "start_layer", 0) or 0) != 0:
            return "pipeline-parallel layer ranges"
        return ""

    def _create_buffers_normal(self):
        cfg = IceCacheConfig.from_env()
        if cfg is not None and cfg.offload and torch.device(self.device).type == "cuda":
            why = self._host_layout_problem()
            if why:
                raise IceCacheConfigError(f"offload keeps SGLang's KV pool in host memory, which needs plain "
                                          f"[slots, heads, dim] planes; this pool has {why}")
            self.host_resident = True
        why = "IceCache is off" if cfg is None else self._shared_keys_problem()
        if why:
            logger.info("IceCache KV pool: keys are copied to a separate key store (%s)", why)
            return super()._create_buffers_normal()
        self.anchors = cfg.anchor_layers(self.layer_num)
        rows = self.size + self.page_size
        k_shape, v_shape = self._kv_buffer_shapes()
        assert k_shape[0] == rows and tuple(k_shape[1:]) == (self.head_num, self.head_dim), k_shape
        pdir = PrivateDir.create()
        try:
            store = KeyStore.create(pdir.path, max(len(self.anchors), 1), rows, self.head_num, self.head_dim,
                                    KEY_DTYPES[self.dtype], name=f"keys-r{_tp_rank()}")
        except BaseException:
            pdir.cleanup()
            raise
        self.private_dir, self.key_store = pdir, store
        planes = {a: _torch_view(store.keys[i], self.dtype) for i, a in enumerate(self.anchors)}
        self.k_buffer = [planes[layer] if layer in planes else torch.zeros(k_shape, dtype=self.store_dtype)
                         for layer in range(self.layer_num)]
        self.v_buffer = [torch.zeros(v_shape, dtype=self.store_dtype) for _ in range(self.layer_num)]
        if self.host_resident:  # the GPU reads and writes these planes directly
            # the key store in one registration (its planes share pages at their seams), the other planes each
            regions = [(store.keys.ctypes.data, store.spec.nbytes)] + [
                (t.data_ptr(), t.numel() * t.element_size())
                for t in [t for i, t in enumerate(self.k_buffer) if i not in planes] + self.v_buffer]
            try:
                for ptr, nbytes in regions:
                    register_host_memory(ptr, nbytes)
            except RuntimeError as e:
                gb = sum(nbytes for _, nbytes in regions) / 2**30
                raise IceCacheConfigError(
                    f"offload: {gb:.1f} GiB of host memory for SGLang's KV pool could not be pinned for the GPU "
                    f"({e}); lower host_kv_gb (or --max-total-tokens)") from None
        logger.info("IceCache KV pool: the K planes of %d anchor layers are the indexer's key store %s "
                    "(%.2f GiB, one copy of the keys)%s", len(self.anchors), store.spec.path,
                    store.spec.nbytes / 2**30, "; every plane in pinned host memory (offload)" * self.host_resident)

    def _store_kv_layer(self, layer_idx, loc, cache_k, cache_v):
        """The model's KV write of one layer; a GPU writing the host-resident pool writes across PCIe."""
        k_buf, v_buf = self.k_buffer[layer_idx], self.v_buffer[layer_idx]
        if k_buf.device == cache_k.device:
            return super()._store_kv_layer(layer_idx, loc, cache_k, cache_v)
        write_rows(cache_k, k_buf, loc)
        write_rows(cache_v, v_buf, loc)


def write_rows(x: torch.Tensor, plane: torch.Tensor, loc: torch.Tensor) -> None:
    """``plane[loc] = x`` for a plane in pinned host memory and ``x`` / ``loc`` on the GPU: a Triton kernel
    writes the rows across PCIe (``kernels/row_copy.py``), in stream order, without a host round trip."""
    from icecache_sglang.kernels import copy_rows

    n = x.shape[0]
    copy_rows(x.reshape(n, -1), plane.view(plane.shape[0], -1), dst_rows=loc)


def register_host_memory(ptr: int, nbytes: int) -> None:
    """Pin host memory for the GPU in place, exactly its size (``cudaHostRegister``, mapped into the GPU's
    address space at the same address; torch's pinned allocator would round a plane up to a power of two)."""
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed with error {int(err)}")


#: with offload on a GPU and no ``host_kv_gb``: this share of the host's available memory, split among its ranks
DEFAULT_HOST_SHARE = 0.5
#: the most of the host's available memory ``host_kv_gb`` may take for all ranks (the rest: weights while they
#: load, the indexers' indexes, the key store's file)
MAX_HOST_SHARE = 0.9


def available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def default_host_kv_gb(ranks: int) -> float:
    """``host_kv_gb`` when none is given, on a GPU: half the host's available memory, split among its ranks."""
    return round(DEFAULT_HOST_SHARE * available_host_bytes() / max(ranks, 1) / 2**30, 2)


def host_budget_problem(cfg: IceCacheConfig, ranks: int) -> str:
    """Why the host cannot give each of ``ranks`` ranks ``host_kv_gb`` ('' when it can: checked at launch,
    before any rank allocates)."""
    if cfg.host_kv_gb is None:
        return ""
    want, avail = cfg.host_kv_gb * 2**30 * ranks, available_host_bytes()
    if want > MAX_HOST_SHARE * avail:
        return (f"host_kv_gb {cfg.host_kv_gb} GiB x {ranks} rank(s) is more than {MAX_HOST_SHARE:.0%} of the "
                f"host's available memory ({avail / 2**30:.1f} GiB); lower host_kv_gb")
    return ""


def host_pool_bytes(cfg: IceCacheConfig) -> int | None:
    """With offload, SGLang's KV pool budget of one rank in bytes (``host_kv_gb``), or None: SGLang's own
    sizing (no ``host_kv_gb`` on a machine without a GPU, where its pool is host memory already). The
    launcher sets ``host_kv_gb`` for a GPU when none is given (``patches/cli.py``), so every rank gets the
    same figure."""
    if cfg.host_kv_gb is None:
        return None
    return int(cfg.host_kv_gb * 2**30)


def _tp_rank() -> int:
    """This scheduler's TP rank (the store is named for it, as ``Indexer.launch`` names its own)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank)
    except Exception:  # noqa: BLE001 - outside a scheduler (tests): rank 0
        return 0


def _torch_view(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor over the store's memory (bfloat16 is held as uint16 words)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def shared_key_store(pool) -> tuple[KeyStore, PrivateDir] | None:
    """The key store a pool's anchor K planes live in, or None when the pool holds its keys itself."""
    store = getattr(pool, "key_store", None)
    return None if store is None else (store, pool.private_dir)
