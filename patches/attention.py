"""The ``icecache`` attention backend in SGLang's registry (constructed lazily, in scheduler processes)."""

from __future__ import annotations

BACKEND_NAME = "icecache"


def create_icecache_backend(runner):
    from icecache_sglang.runtime.backend import IceCacheAttnBackend

    return IceCacheAttnBackend(runner)


def install() -> None:
    from sglang.srt.arg_groups import choices
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if BACKEND_NAME not in choices.ATTENTION_BACKEND_CHOICES:
        choices.ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_icecache_backend)
