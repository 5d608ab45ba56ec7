"""Settings a running server changes without a restart: ``POST /icecache/config``.

The HTTP process validates the new settings against the launch configuration and publishes them, with a
version number, as ``control.json`` in the server's private run directory (``rundir.py``). Each rank
checks the file's modification time at every forward pass, applies a newer version between two forward
passes and reports the version it runs in its snapshot (``config_version``), so a client waits until every
rank shows it (``ServerProcess.set_icecache``).

Only the runtime keys travel and only they are ever applied: a rank rebuilds its configuration from its
launch configuration plus these keys, validated again, so a file that names anything else (sink, window,
dense layers, page size) or a bad value is refused with a warning and changes nothing.

A request decoding sparsely becomes dense at its next step when a new budget covers its length; the budget
decides for the others. Meant for evaluation (one server, one prefill per prompt through the radix cache,
many selection modes) and for tuning.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .config import IceCacheConfig, IceCacheConfigError
from .rundir import CONTROL_FILE, RunDir, RunDirError

logger = logging.getLogger(__name__)

#: what can change on a running server (the rest sizes processes and buffers at launch)
RUNTIME_KEYS = ("budget_tokens", "selection", "gqa_merge", "query", "selection_deadline_ms", "while_indexing",
                "step_reuse", "max_stale_steps", "token_rerank")


def updated(base: IceCacheConfig, settings: dict) -> IceCacheConfig:
    """``base`` with ``settings`` applied, validated like ``--icecache-config``."""
    if not isinstance(settings, dict):
        raise IceCacheConfigError(f"expected a JSON object of settings, got {type(settings).__name__}")
    fixed = sorted(set(settings) - set(RUNTIME_KEYS))
    if fixed:
        raise IceCacheConfigError(f"{fixed} cannot change on a running server (only {list(RUNTIME_KEYS)})")
    if base.offload:  # the lanes were sized at launch: the budget and the staleness must fit them
        v = {k: settings.get(k, getattr(base, k)) for k in ("budget_tokens", "step_reuse", "max_stale_steps")}
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v.values()):
            stale = max(v["step_reuse"] - 1, v["max_stale_steps"])
            rows = v["budget_tokens"] + base.page_size + stale
            if rows > base.lane_rows:
                raise IceCacheConfigError(
                    f"budget_tokens {v['budget_tokens']} with a staleness of {stale} steps needs lanes of {rows} "
                    f"rows; with offload the device pool's lanes hold {base.lane_rows} (budget_tokens + page_size "
                    f"+ max(step_reuse - 1, max_stale_steps) at launch: {base.budget_tokens} + {base.page_size} + "
                    f"{base.reuse_rows})")
    try:
        return replace(base, **settings)
    except TypeError as e:
        raise IceCacheConfigError(str(e)) from None


def runtime_settings(cfg: IceCacheConfig) -> dict:
    return {k: getattr(cfg, k) for k in RUNTIME_KEYS}


def write_control(run_dir: RunDir, cfg: IceCacheConfig, version: int) -> int:
    """Publish ``cfg``'s runtime settings for the server's ranks as ``version`` (larger than any before)."""
    run_dir.write_json(CONTROL_FILE, {"version": version, "settings": runtime_settings(cfg)})
    return version


def read_control(run_dir: RunDir) -> tuple[int, dict] | None:
    """(version, runtime settings) as published; None when nothing was. Raises ``RunDirError`` for a file
    that is not ours, :class:`IceCacheConfigError` for one that is malformed."""
    data = run_dir.read_json(CONTROL_FILE)
    if data is None:
        return None
    version, settings = data.get("version"), data.get("settings")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or not isinstance(settings, dict):
        raise IceCacheConfigError("the control file must hold {\"version\": positive int, \"settings\": {...}}")
    return version, settings


class ControlWatcher:
    """A rank's side: the settings posted since the last forward pass, on top of the launch configuration.
    One ``lstat`` per pass when nothing was posted (the file is written before the HTTP reply, so the next
    request runs with the new settings)."""

    def __init__(self, run_dir: RunDir | None, launch_cfg: IceCacheConfig):
        self.run_dir, self.launch_cfg = run_dir, launch_cfg
        self.version = 0  # the version in force (0: the launch configuration)
        self._mtime = None

    def poll(self) -> IceCacheConfig | None:
        """The configuration of a newer published version (then ``version`` is its number), else None. A
        file that is not ours or is malformed is refused with an error in the log; nothing changes."""
        if self.run_dir is None:
            return None
        mtime = self.run_dir.mtime_ns(CONTROL_FILE)
        if mtime is None or mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            got = read_control(self.run_dir)
            if got is None or got[0] <= self.version:
                return None
            cfg = updated(self.launch_cfg, got[1])
        except (RunDirError, IceCacheConfigError) as e:
            logger.error("IceCache: control file refused, settings unchanged: %s", e)
            return None
        self.version = got[0]
        return cfg
