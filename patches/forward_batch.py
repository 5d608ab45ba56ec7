"""Which requests of an extend batch are on their last prefill chunk (AFTER hook on ``ForwardBatch.init_new``).

While IceCache is on, each extend batch tells ``runtime.events.extend_batch`` per request (its
``req_to_token`` row) whether this chunk ends its prompt (SGLang's own test, ``req.extend_end ==
len(req.full_untruncated_fill_ids)``, which it uses for ``contains_last_prefill_chunk``). The backend then
indexes a long prompt once, right after its last chunk, instead of chunk by chunk (several times the
indexer's work) or only at its first decode step (too late to overlap with other requests' prefill). Where
SGLang's request objects lack those fields nothing is told and the first decode step indexes. (An attribute
set on the returned ``ForwardBatch`` did not reach the attention backend in 0.5.23, hence the side channel.)
"""

from __future__ import annotations

import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def last_chunk_rows(batch, rows: list[int]) -> dict[int, bool] | None:
    """``req_to_token`` row -> whether that request's extend reaches the end of its prompt, for the
    requests of ``batch`` (SGLang's ScheduleBatch) in order, whose rows are ``rows``."""
    try:
        decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or ())}
        final = [r.extend_end == len(r.full_untruncated_fill_ids) for r in batch.reqs if id(r) not in decoding]
    except (AttributeError, TypeError):
        return None
    return dict(zip(rows, final)) if len(final) == len(rows) else None


def _after_init_new(result, *args, **kwargs):
    from icecache_sglang.runtime.config import ENV_VAR

    if ENV_VAR not in os.environ or result is None:
        return None
    # called as a classmethod: (cls, batch, model_runner, ...)
    batch = kwargs.get("batch") or next((a for a in args if not isinstance(a, type) and hasattr(a, "reqs")), None)
    mode = getattr(result, "forward_mode", None)
    if batch is None or mode is None or not mode.is_extend():
        return None
    rows = last_chunk_rows(batch, result.req_pool_indices.cpu().tolist())
    if rows is not None:
        from icecache_sglang.runtime import events

        events.extend_batch(rows)
    return None


def install() -> None:
    HookRegistry.register(TARGET, _after_init_new, HookType.AFTER)
