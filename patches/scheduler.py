"""IceCache's stall report on SGLang's scheduler (AFTER hook on ``Scheduler.init_soft_watchdog``).

While IceCache is on and ``stall_report_s`` is not 0, each scheduler gets a ``runtime.stall.StallReporter``
on its own thread: a forward pass (SGLang's ``forward_ct`` not moving while ``cur_batch_for_debug`` holds a
batch, the condition of SGLang's own watchdog) that takes ``stall_report_s`` seconds or more is logged with
the scheduler thread's Python stack. SGLang's watchdog is untouched.
"""

from __future__ import annotations

import logging
import os
import threading

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.managers.scheduler.Scheduler.init_soft_watchdog"
logger = logging.getLogger(__name__)


def _after_init_soft_watchdog(result, scheduler, *args, **kwargs):
    from icecache_sglang.runtime.config import ENV_VAR, IceCacheConfig

    if ENV_VAR not in os.environ:
        return None
    after = IceCacheConfig.from_env().stall_report_s
    if not after:
        return None
    from icecache_sglang.runtime.stall import StallReporter

    scheduler.icecache_stall_reporter = StallReporter(
        thread_id=threading.get_ident(), get_counter=lambda: scheduler.forward_ct,
        is_active=lambda: scheduler.cur_batch_for_debug is not None, after_s=after, log=logger.warning)
    return None


def install() -> None:
    HookRegistry.register(TARGET, _after_init_soft_watchdog, HookType.AFTER)
