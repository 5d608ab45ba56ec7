"""KV-slot events: after SGLang's token allocators free slots or reset, tell ``runtime.events``.

Every path that returns a slot to SGLang's free list ends in one of these methods (radix eviction,
``release_kv_cache`` of a request without radix cache or of a duplicate prefix, retraction, abort,
``flush_cache``), so IceCache can drop index entries that name the slot before its keys are overwritten.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TOKEN = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"
PAGED = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"


def _after_token_free(result, allocator, free_index, *args, **kwargs):
    if allocator.free_group is None:  # grouped frees arrive again, concatenated, at free_group_end
        from icecache_sglang.runtime import events

        events.slots_freed(free_index)
    return result


def _after_release_pages(result, allocator, *page_ids, **kwargs):
    import torch

    from icecache_sglang.runtime import events

    ps = allocator.page_size
    for pages in page_ids:
        if pages.numel():
            slots = (pages.to(torch.int64).view(-1, 1) * ps + torch.arange(ps, device=pages.device)).view(-1)
            events.slots_freed(slots)
    return result


def _after_clear(result, *args, **kwargs):
    from icecache_sglang.runtime import events

    events.slots_cleared()
    return result


def install() -> None:
    HookRegistry.register(f"{TOKEN}.free", _after_token_free, HookType.AFTER)
    HookRegistry.register(f"{TOKEN}.clear", _after_clear, HookType.AFTER)
    HookRegistry.register(f"{PAGED}._release_page_ids", _after_release_pages, HookType.AFTER)
    HookRegistry.register(f"{PAGED}.clear", _after_clear, HookType.AFTER)
