"""Which requests of an extend batch are on their last prefill chunk (AFTER hook on ``ForwardBatch.init_new``).

While IceCache is on, each extend batch tells ``runtime.events.extend_batch`` per request, in the batch's
order (the order of its ``req_to_token`` rows), whether this chunk ends its prompt (SGLang's own test, ``req.extend_end ==
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


def prompt_ends(batch) -> list[bool] | None:
    """Per request of ``batch`` (SGLang's ScheduleBatch), in order, whether its extend reaches the end of
    its prompt."""
    try:
        decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or ())}
        return [r.extend_end == len(r.full_untruncated_fill_ids) for r in batch.reqs if id(r) not in decoding]
    except (AttributeError, TypeError):
        return None


def _after_init_new(result, *args, **kwargs):
    from icecache_sglang.runtime.config import ENV_VAR

    if ENV_VAR not in os.environ or result is None:
        return None
    # the hooked classmethod is called with (cls, batch, model_runner, ...)
    batch = kwargs["batch"] if "batch" in kwargs else (args[1] if len(args) > 1 else None)
    mode = getattr(result, "forward_mode", None)
    if batch is None or mode is None or not mode.is_extend():
        return None
    from icecache_sglang.runtime import events

    events.extend_batch(prompt_ends(batch) or [])  # [] (not known): the first decode step indexes
    return None


def install() -> None:
    HookRegistry.register(TARGET, _after_init_new, HookType.AFTER)
