"""IceCache's routes on SGLang's HTTP server: ``GET /icecache/stats`` (the snapshot of every TP rank of this
server) and ``POST /icecache/config`` (settings that change without a restart, ``runtime/control.py``).

``POST /icecache/config`` changes server-wide state, so it carries SGLang's admin auth level, as
``/flush_cache`` does: with ``--admin-api-key`` only that key is accepted, with only ``--api-key`` that key,
with neither it is open like every route (bind the server to a trusted interface). ``GET /icecache/stats``
is a normal route (``--api-key`` applies to it).
"""

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


def read_stats(run_dir) -> dict:
    """Snapshots of this server's ranks; one whose scheduler process is gone is removed instead."""
    from icecache_sglang.runtime.rundir import RunDirError

    ranks = {}
    for name in run_dir.names("rank-", ".json"):
        try:
            data = run_dir.read_json(name)
        except RunDirError:
            continue
        if data is None:
            continue
        if not _alive(data.get("pid")):
            run_dir.unlink(name)
            continue
        ranks[str(data.get("rank", name))] = data
    return {"enabled": bool(ranks), "ranks": ranks, "run_dir": str(run_dir.path)}


def _before_launch_server(server_args, *args, **kwargs):
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.utils.auth import AuthLevel, auth_level

    from icecache_sglang.runtime.rundir import RunDir

    if any(getattr(r, "path", None) == "/icecache/stats" for r in app.routes):
        return
    run_dir = RunDir.from_env()  # created by --enable-icecache's validation (patches/cli.py)

    async def icecache_stats():
        if run_dir is None:
            return {"enabled": False, "ranks": {}}
        return read_stats(run_dir)

    app.add_api_route("/icecache/stats", icecache_stats, methods=["GET"])
    app.add_api_route("/icecache/config", auth_level(AuthLevel.ADMIN_OPTIONAL)(_config_route(run_dir)),
                      methods=["POST"])


def _config_route(run_dir):
    import logging

    from fastapi import Request
    from fastapi.responses import JSONResponse

    logger = logging.getLogger(__name__)
    published = {"version": 0, "config": None}  # what this process last wrote (versions only grow)

    async def icecache_config(request: Request):
        import json

        from icecache_sglang.runtime.config import IceCacheConfig, IceCacheConfigError
        from icecache_sglang.runtime.control import read_control, runtime_settings, updated, write_control
        from icecache_sglang.runtime.rundir import RunDirError

        base = IceCacheConfig.from_env()
        if base is None or run_dir is None:
            return JSONResponse({"error": "this server runs without --enable-icecache"}, status_code=400)
        try:
            settings = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be one JSON object"}, status_code=400)
        try:  # the settings in force: the last ones published, on top of the launch configuration
            current = read_control(run_dir)
            in_force = updated(base, current[1]) if current else base
            last = current[0] if current else 0
        except (IceCacheConfigError, RunDirError) as e:  # a damaged file: what this process last published
            logger.error("IceCache: control file unreadable (%s); starting from the last published settings", e)
            in_force, last = published["config"] or base, 0
        try:
            if not isinstance(settings, dict):
                raise IceCacheConfigError(f"expected a JSON object of settings, got {type(settings).__name__}")
            # validated against the launch configuration (as each rank applies it), with the settings in force
            cfg = updated(base, {**runtime_settings(in_force), **settings})
            version = write_control(run_dir, cfg, max(last, published["version"]) + 1)
        except IceCacheConfigError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except RunDirError as e:
            return JSONResponse({"error": f"the server's run directory is unusable: {e}"}, status_code=500)
        published.update(version=version, config=cfg)
        return {"version": version, "config": json.loads(cfg.to_json())}

    return icecache_config


def install() -> None:
    HookRegistry.register(f"{HTTP}.launch_server", _before_launch_server, HookType.BEFORE)
