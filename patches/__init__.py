"""Every hook into SGLang internals, installed as ``icecache_sglang.patches``. Not built yet: see issue 4."""
