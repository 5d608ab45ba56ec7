"""Settings a running server changes without a restart: ``POST /icecache/config``.

The HTTP process validates the new settings against the launch configuration and writes them, with a
version number, to ``control-<port>.json`` beside the ranks' snapshots. Each rank's publisher thread reads
the file (every 0.5 s); the backend applies it between two forward passes and reports the version it runs
in its snapshot (``config_version``), so a client waits until every rank shows it (``ServerProcess.set_icecache``).

Requests already decoding sparsely stay sparse; the new budget decides for the others. Meant for
evaluation (one server, one prefill per prompt through the radix cache, many selection modes) and for tuning.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from .config import IceCacheConfig, IceCacheConfigError
from .metrics import stats_dir

#: what can change on a running server (the rest sizes processes and buffers at launch)
RUNTIME_KEYS = ("budget_tokens", "selection", "query", "selection_deadline_ms")


def control_path(port: int | str | None = None) -> Path:
    port = os.environ.get("ICECACHE_SERVER_PORT", "0") if port is None else port
    return stats_dir() / f"control-{port}.json"


def updated(base: IceCacheConfig, settings: dict) -> IceCacheConfig:
    """``base`` with ``settings`` applied, validated like ``--icecache-config``."""
    if not isinstance(settings, dict):
        raise IceCacheConfigError(f"expected a JSON object of settings, got {type(settings).__name__}")
    fixed = sorted(set(settings) - set(RUNTIME_KEYS))
    if fixed:
        raise IceCacheConfigError(f"{fixed} cannot change on a running server (only {list(RUNTIME_KEYS)})")
    return replace(base, **settings)


def write_control(port: int | str, cfg: IceCacheConfig) -> int:
    """Publish ``cfg`` for the ranks of the server on ``port``; returns its version."""
    path = control_path(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = (read_control(port) or (0, None))[0] + 1
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": version, "config": json.loads(cfg.to_json())}))
    tmp.replace(path)
    return version


def read_control(port: int | str | None = None) -> tuple[int, IceCacheConfig] | None:
    try:
        data = json.loads(control_path(port).read_text())
        return int(data["version"]), IceCacheConfig(**data["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_control(port: int | str) -> None:
    control_path(port).unlink(missing_ok=True)
