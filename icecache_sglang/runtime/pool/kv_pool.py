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
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ...indexer.keystore import KeyStore, PrivateDir
from ..config import IceCacheConfig

logger = logging.getLogger(__name__)

#: the KV dtypes a key store can hold, by their names (the backend checks a pool's dtype against it too)
KEY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class IceCacheKVPool(MHATokenToKVPool):
    #: the key store whose layers are this pool's anchor K planes (None: the in-tree buffers)
    key_store: KeyStore | None = None
    private_dir: PrivateDir | None = None
    anchors: list[int] = []

    def _shared_keys_problem(self) -> str:
        """Why this pool cannot hold its keys in a shared store ('' when it can)."""
        if torch.device(self.device).type != "cpu":
            return f"the pool is on {self.device} (device memory)"
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
        logger.info("IceCache KV pool: the K planes of %d anchor layers are the indexer's key store %s "
                    "(%.2f GiB, one copy of the keys)", len(self.anchors), store.spec.path, store.spec.nbytes / 2**30)


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
