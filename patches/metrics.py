"""``GET /icecache/stats`` on SGLang's HTTP server: the IceCache snapshot of every TP rank of this server."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

HTTP = "sglang.srt.entrypoints.http_server"


def _alive(pid) -> bool:
    import os

    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def read_stats(port: int) -> dict:
    """Snapshots of this server's ranks; one whose scheduler process is gone (an earlier server on the same
    port; SGLang kills schedulers without running their exit handlers) is removed instead."""
    import json

    from icecache_sglang.runtime.metrics import stats_dir

    ranks = {}
    for path in sorted(stats_dir().glob(f"icecache-r*-{port}.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(data.get("pid")):
            path.unlink(missing_ok=True)
            continue
        ranks[str(data.get("rank", path.stem))] = data
    return {"enabled": bool(ranks), "ranks": ranks}


def _before_launch_server(server_args, *args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    if any(getattr(r, "path", None) == "/icecache/stats" for r in app.routes):
        return
    port = server_args.port

    async def icecache_stats():
        return read_stats(port)

    app.add_api_route("/icecache/stats", icecache_stats, methods=["GET"])
    return


def install() -> None:
    HookRegistry.register(f"{HTTP}.launch_server", _before_launch_server, HookType.BEFORE)
