"""IceCache's KV memory, apart from the cache logic that uses it (``backend.py``, ``sequences.py``):

- ``kv_pool.py``: the pool SGLang allocates through (installed by ``patches/pool.py``); in host memory its
  anchor layers' K planes are the indexer's key store (one copy of the keys);
- ``device_pool.py``: with ``offload``, the fixed-size device pool decode attention reads (one lane per
  decoding request: sink + selected pages + recent tokens), filled from SGLang's pool;
- ``staging.py``: with ``offload``, the device buffer prefill attends over, one layer of an extend batch's
  rows gathered from SGLang's (host) pool.
"""

from .device_pool import DeviceKVPool
from .kv_pool import IceCacheKVPool, shared_key_store

__all__ = ["DeviceKVPool", "IceCacheKVPool", "shared_key_store"]
