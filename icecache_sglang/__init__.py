"""icecache-sglang: IceCache (paged multi-level DCI KV-cache offloading) for SGLang.

Layout (dependencies point one way: runtime -> indexer -> index):

- ``icecache_sglang.index``   the paged M-DCI index and selection baselines (numpy + numba only)
- ``icecache_sglang.indexer`` the CPU indexing process behind ZeroMQ
- ``icecache_sglang.runtime`` SGLang-facing objects (memory pool, attention backend, radix cache)
- ``icecache_sglang.models``  fetching the pinned PyPI models, converting them, capturing Q/K
- ``icecache_sglang.kernels`` Triton/GPU kernels (source folder ``kernels/``)
- ``icecache_sglang.patches`` every hook into SGLang internals (source folder ``patches/``)
"""

__version__ = "0.1.0.dev0"
