"""IceCache's routes on SGLang's HTTP server: ``GET /icecache/stats`` (the snapshot of every TP rank of this
server) and ``POST /icecache/config`` (settings that change without a restart, ``runtime/control.py``)."""

# no `from __future__ import annotations` here: FastAPI reads the route's `Request` annotation as an object

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
    app.add_api_route("/icecache/config", _config_route(port), methods=["POST"])
    from icecache_sglang.runtime.control import clear_control

    clear_control(port)  # an earlier server's settings on this port do not carry over


def _config_route(port: int):
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def icecache_config(request: Request):
        from icecache_sglang.runtime.config import IceCacheConfig, IceCacheConfigError
        from icecache_sglang.runtime.control import read_control, updated, write_control

        base = IceCacheConfig.from_env()
        if base is None:
            return JSONResponse({"error": "this server runs without --enable-icecache"}, status_code=400)
        try:
            settings = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be one JSON object"}, status_code=400)
        current = read_control(port)
        try:
            cfg = updated(current[1] if current else base, settings)
        except (IceCacheConfigError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        version = write_control(port, cfg)
        return {"version": version, "config": json.loads(cfg.to_json())}

    import json

    return icecache_config


def install() -> None:
    HookRegistry.register(f"{HTTP}.launch_server", _before_launch_server, HookType.BEFORE)
