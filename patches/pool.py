"""IceCache's KV pool class in SGLang's pool construction (``SRTPlatform.get_kv_pool_cls``).

While IceCache is on (its configuration is in the environment), the MHA pool SGLang builds is
``runtime.pool.IceCacheKVPool``: the in-tree pool, whose anchor layers' K planes live in the indexer's key
store when the pool is in host memory. A platform that brings its own pool class keeps it.
"""

from __future__ import annotations

import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.platforms.interface.SRTPlatform.get_kv_pool_cls"


def _around_get_kv_pool_cls(original, platform, *args, **kwargs):
    cls = original(platform, *args, **kwargs)
    kind = kwargs.get("kind", args[0] if args else None)
    from icecache_sglang.runtime.config import ENV_VAR

    if cls is not None or kind != "mha" or ENV_VAR not in os.environ:
        return cls
    from icecache_sglang.runtime.pool import IceCacheKVPool

    return IceCacheKVPool


def install() -> None:
    HookRegistry.register(TARGET, _around_get_kv_pool_cls, HookType.AROUND)
