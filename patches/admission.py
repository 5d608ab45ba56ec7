"""SGLang's prefill admission under offload (AROUND hook on ``PrefillAdder.add_one_req``).

With offload an extend batch attends over a staging buffer of fixed size on the device
(``runtime/pool/staging.py``: one layer of every request's prefix and new tokens, ``prefill_staging_tokens``
rows). SGLang admits a prefill by its new tokens and KV memory only; a batch of radix hits on long prefixes
would stage far more than its new tokens. So, after the batch's first request, a request whose prefix and
new tokens would not fit beside the requests already in the batch is held back as SGLang holds back any
request it cannot fit now (``AddReqResult.OTHER``: it stays at the head of the waiting queue and runs in a
later batch). Without a staging buffer in this process (IceCache off, or no offload) nothing changes.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"


def _staged_rows(req) -> int:
    """Rows a request admitted to this batch stages: its prefix and this chunk's new tokens."""
    end = getattr(req, "extend_end", None)
    return int(end) if end is not None else len(req.full_untruncated_fill_ids)


def _around_add_one_req(original, adder, req, *args, **kwargs):
    from icecache_sglang.runtime.pool import staging

    if staging.rows_limit() is not None:
        staged = sum(_staged_rows(r) for r in adder.can_run_list)
        # the request's whole remaining prompt (at most: admission may cut it into a chunk)
        if not staging.batch_fits(staged, len(req.full_untruncated_fill_ids)):
            from sglang.srt.managers.schedule_policy import AddReqResult

            return AddReqResult.OTHER
    return original(adder, req, *args, **kwargs)


def install() -> None:
    HookRegistry.register(TARGET, _around_add_one_req, HookType.AROUND)
