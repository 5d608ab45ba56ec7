"""Every hook into SGLang internals, installed as ``icecache_sglang.patches``.

``register()`` is the ``sglang.srt.plugins`` entry point: SGLang calls it in the launcher before argument
parsing and again in every spawned process. It only registers hooks (``HookRegistry``, applied by SGLang
right after) and the ``icecache`` attention backend; registering twice is harmless. Without
``--enable-icecache`` none of the hooks changes anything: a plain launch behaves like stock SGLang.

| file | hooks |
|---|---|
| ``cli.py`` | ``--enable-icecache`` / ``--icecache-config`` on ``ServerArgs.add_cli_args``; validation and the backend choice on ``ServerArgs.from_cli_args``; the config travels to schedulers as an environment variable |
| ``attention.py`` | the ``icecache`` entry in SGLang's attention-backend registry |
| ``allocator.py`` | KV-slot free / clear events from SGLang's token allocators (radix eviction, ``flush_cache``) |
| ``pool.py`` | IceCache's KV pool class (``runtime.pool.IceCacheKVPool``) where SGLang picks the MHA pool class, and with offload its size (``host_kv_gb``) where SGLang sizes its KV budget |
| ``metrics.py`` | ``GET /icecache/stats`` and the IceCache lines of ``/metrics`` on SGLang's HTTP server |
| ``forward_batch.py`` | which requests of an extend batch are on their last prefill chunk (``runtime.events.extend_batch``) |
| ``admission.py`` | with offload, SGLang's prefill admission keeps an extend batch within the prefill staging buffer |
| ``scheduler.py`` | the stall report: a forward pass slower than ``stall_report_s`` is logged with the scheduler's stack |
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from . import admission, allocator, attention, cli, forward_batch, metrics, pool, scheduler

    cli.install()
    attention.install()
    allocator.install()
    metrics.install()
    pool.install()
    scheduler.install()
    forward_batch.install()
    admission.install()
