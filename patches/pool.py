"""IceCache's KV pool class in SGLang's pool construction (``SRTPlatform.get_kv_pool_cls``).

While IceCache is on (its configuration is in the environment), the MHA pool SGLang builds is
``runtime.pool.IceCacheKVPool``: the in-tree pool, whose anchor layers' K planes live in the indexer's key
store when the pool is in host memory. A platform that brings its own pool class keeps it. With offload the
pool is host memory on a GPU too, and its size (SGLang's KV capacity) comes from ``host_kv_gb``.
"""

from __future__ import annotations

import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.platforms.interface.SRTPlatform.get_kv_pool_cls"
#: the KV pool's byte budget (free GPU memory less SGLang's slack on a GPU): with offload, host memory's
SIZE_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"


def _around_get_kv_pool_cls(original, platform, *args, **kwargs):
    cls = original(platform, *args, **kwargs)
    kind = kwargs.get("kind", args[0] if args else None)
    from icecache_sglang.runtime.config import ENV_VAR

    if cls is not None or kind != "mha" or ENV_VAR not in os.environ:
        return cls
    from icecache_sglang.runtime.pool import IceCacheKVPool

    return IceCacheKVPool


def _after_profile_available_bytes(result, configurator, *_args, **_kwargs):
    """With offload, SGLang sizes its KV pool (what it admits, what the radix cache keeps) by the host
    memory given to it, not by free GPU memory: ``runtime.pool.kv_pool.host_pool_bytes``. The original still
    runs first on every rank (its memory check and its collective are kept)."""
    from icecache_sglang.runtime.config import IceCacheConfig

    cfg = IceCacheConfig.from_env()
    if cfg is None or not cfg.offload:
        return None
    from icecache_sglang.runtime.pool.kv_pool import host_pool_bytes

    return host_pool_bytes(cfg)


def install() -> None:
    HookRegistry.register(TARGET, _around_get_kv_pool_cls, HookType.AROUND)
    HookRegistry.register(SIZE_TARGET, _after_profile_available_bytes, HookType.AFTER)
