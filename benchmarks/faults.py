"""The fault benchmark: real SGLang servers with ``--enable-icecache`` (CPU path, the tiny random Llama), one
fault per scenario, every request to 127.0.0.1, and a record per scenario of what the fault cost.

Each scenario runs the same frame: the server's answer to a fixed long prompt (decoded sparsely, from an
empty cache) is taken before; the fault is caused while requests decode; then the server must be alive,
every request not aborted must have completed, ``flush_cache`` must leave no sequence, index byte or
shared-memory entry behind, and the fixed prompt must get the same answer as before (after the indexer is
serving again, when the fault took it down).

Scenarios (``SCENARIOS``): the indexer SIGKILLed once mid-decode; SIGKILLed more times than the restart
budget; SIGSTOPped for 5 s then SIGCONTed; a restart that fails (something sits where the replacement's
socket goes); 200 concurrent streamed requests with 25% client disconnects; ``flush_cache`` during decode;
a POST of an absurd budget (and of the largest one, while a request decodes); unauthorised POSTs under
``--api-key`` and ``--admin-api-key``; malformed, planted and symlinked control files; 300 fuzzed messages
sent to the indexer while it serves.

    python benchmarks/faults.py             # every scenario on a fresh server
    python benchmarks/faults.py --quick     # every scenario, sharing two servers (< 10 minutes on 2 cores)
    python benchmarks/faults.py --scenarios sigstop_5s absurd_budget

Records: ``benchmarks/results/faults[_quick].{json,png}`` (``--table FILE`` prints the README's table).
``tests/test_server_faults.py`` runs the same scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, png_path, write_records  # noqa: E402

from icecache_sglang.launch import ServerProcess  # noqa: E402

NAME = "faults"
API_KEY = "icecache-faults-user-key"
ADMIN_KEY = "icecache-faults-admin-key"
#: the fault servers' IceCache settings: everything beyond 128 tokens sparse, a short restart window so a
#: spent budget frees again within a scenario; every step selects (``while_indexing: wait``), so faults hit
#: selections (the default's dense steps while the indexer is behind: tests/test_server_indexing.py)
FAULT_ICE = {"budget_tokens": 128, "page_size": 16, "sink_tokens": 16, "window_tokens": 16, "dense_layers": 0,
             "max_restarts": 2, "restart_window_s": 30.0, "selection_deadline_ms": 500, "while_indexing": "wait"}
FIXED_PROMPT_TOKENS = 600


def server_args(*more: str) -> list[str]:
    return ["--enable-icecache", "--icecache-config", json.dumps(FAULT_ICE), "--enable-metrics", *more]


def fault_model():
    """The tiny random Llama with a strong attention gain: its greedy answers change with the pages attention
    reads (at the default gain they barely do), so "the same answer after the fault" means the same pages."""
    from icecache_sglang.models.tiny import SENSITIVE_GAIN, ensure_tiny_model

    return ensure_tiny_model(attention_gain=SENSITIVE_GAIN)


def start_server(log_path: Path, admin: bool = False, model_path=None) -> ServerProcess:
    """A fault server: ``--api-key`` (and ``--admin-api-key`` when ``admin``)."""
    keys = ["--api-key", API_KEY] + (["--admin-api-key", ADMIN_KEY] if admin else [])
    srv = ServerProcess(model_path or fault_model(), server_args(*keys), log_path=log_path, api_key=API_KEY)
    srv.admin_key = ADMIN_KEY if admin else API_KEY
    return srv.start()


# ---------------------------------------------------------------------------------------------- helpers
def token_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(100, 40000), k=n)


def stats(srv: ServerProcess, wait_s: float = 1.2) -> dict:
    return srv.icecache_stats(wait_s=wait_s)


def alive(srv: ServerProcess) -> bool:
    try:
        return srv.proc is not None and srv.proc.poll() is None and srv.get("/health", timeout_s=10) is not None
    except (urllib.error.URLError, OSError):
        return False


def wait_until(cond: Callable[[], bool], timeout_s: float, every_s: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return False


def poke(srv: ServerProcess) -> None:
    """A short request: the supervisor acts at forward passes, so an idle server changes no state."""
    srv.generate(input_ids=token_ids(12, 9), max_new_tokens=2)


def wait_indexer(srv: ServerProcess, state: str = "up", timeout_s: float = 120.0, not_pid: int | None = None) -> bool:
    """Until the rank reports the indexer ``state`` (with a process other than ``not_pid``: a snapshot
    taken before the scheduler noticed a kill still says "up")."""
    def reached(st: dict) -> bool:
        return st.get("indexer_state") == state and (not_pid is None or st.get("indexer_pid") != not_pid)

    def check() -> bool:
        if reached(stats(srv, 0)):
            return True
        poke(srv)
        return reached(stats(srv, 0.6))
    return wait_until(check, timeout_s, 0.5)


def flush(srv: ServerProcess, timeout_s: float = 60.0) -> bool:
    """``flush_cache`` once the server is idle (SGLang refuses it while requests run)."""
    def once() -> bool:
        try:
            srv.post("/flush_cache", {}, timeout_s=30, key=srv.admin_key)
            return True
        except urllib.error.HTTPError:
            return False
    return wait_until(once, timeout_s, 0.5)


def fixed_answer(srv: ServerProcess) -> str:
    """The answer to the fixed prompt from an empty cache (so the index is built the same way each time),
    with a deadline no step reaches (a selection late on a busy machine would fall back and change it)."""
    assert flush(srv), "flush_cache did not succeed"
    srv.set_icecache(key=srv.admin_key, selection_deadline_ms=30_000)
    try:
        return srv.generate(input_ids=token_ids(FIXED_PROMPT_TOKENS, 424242), max_new_tokens=24)["text"]
    finally:
        srv.set_icecache(key=srv.admin_key, selection_deadline_ms=FAULT_ICE["selection_deadline_ms"])


def server_pids(srv: ServerProcess) -> set[int]:
    """The server's processes: the launcher (HTTP), its schedulers and their indexers."""
    import psutil

    try:
        root = psutil.Process(srv.proc.pid)
        return {root.pid} | {c.pid for c in root.children(recursive=True)}
    except (psutil.Error, AttributeError):
        return set()


def stale_dirs(pids: set[int]) -> list[str]:
    """Private directories in /dev/shm created by one of ``pids`` that is gone: left behind."""
    out = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("-")
        if name.startswith("icecache-") and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) in pids:
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                out.append(name)
    return sorted(out)


def leaks(srv: ServerProcess, pids: set[int] = frozenset()) -> dict:
    """After ``flush_cache``: what IceCache still holds (all zero when nothing leaked): sequences anywhere
    (tracker, ledger, indexer), index bytes, files in the rank's private directory beyond its key store and
    live socket, and private directories whose creator (one of the server's ``pids``) is gone."""
    assert flush(srv), "flush_cache did not succeed"
    st = stats(srv, 1.5)
    tr, ind = st.get("tracker") or {}, st.get("indexer") or {}
    private = Path(st["indexer_endpoint"][len("ipc://"):]).parent
    expected = {f"keys-r{st['rank']}.shm", Path(st["indexer_endpoint"]).name}
    extra = [n for n in os.listdir(private) if n not in expected] if private.is_dir() else ["<private dir gone>"]
    stale = stale_dirs(pids | server_pids(srv))
    return {"leaked_sequences": tr.get("live", 0) + tr.get("retained", 0) + st.get("ledger_sequences", 0)
            + ind.get("sequences", 0),
            "leaked_index_bytes": ind.get("index_bytes", 0),
            "leaked_index_tokens": ind.get("tokens", 0),
            "leaked_shm_entries": len(extra) + len(stale), "leaked_shm_names": extra + stale,
            "slots_referenced": tr.get("slots_referenced", 0), "indexer_answered": bool(ind)}


async def _stream(url: str, headers: dict, payload: dict, disconnect_after: int | None) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json=payload, headers=headers) as resp:
        if resp.status != 200:
            return f"http {resp.status}"
        chunks = 0
        async for line in resp.content:
            if not line.strip().startswith(b"data:"):
                continue
            if line.strip() == b"data: [DONE]":
                return "done"
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return "aborted"  # leaving the session closes the connection: SGLang aborts the request
        return "done"


def stream_many(srv: ServerProcess, jobs: list[tuple[list[int], int, int | None]]) -> list:
    """Streamed ``/generate`` requests (ids, max_new_tokens, disconnect after n chunks or None), concurrently."""
    headers = srv._headers(None)

    async def run_all():
        return await asyncio.gather(*(_stream(srv.url, headers, {
            "input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, cut)
            for ids, n, cut in jobs), return_exceptions=True)

    return asyncio.run(run_all())


class Background:
    """Requests decoding in threads while a fault is caused."""

    def __init__(self, srv: ServerProcess, n: int, prompt_tokens: int, max_new: int, seed: int):
        self.results: list = [None] * n
        self.threads = [threading.Thread(target=self._one, args=(srv, i, token_ids(prompt_tokens + i, seed + i),
                                                                 max_new), daemon=True) for i in range(n)]
        self.max_new = max_new
        for t in self.threads:
            t.start()

    def _one(self, srv, i, ids, max_new):
        try:
            self.results[i] = srv.generate(input_ids=ids, max_new_tokens=max_new, ignore_eos=True)
        except Exception as e:  # noqa: BLE001 - recorded as an error
            self.results[i] = e

    def join(self, timeout_s: float = 600.0) -> dict:
        for t in self.threads:
            t.join(timeout_s)
        errors = [r for r in self.results if not isinstance(r, dict)]
        done = [r for r in self.results if isinstance(r, dict) and r["meta_info"]["completion_tokens"] == self.max_new]
        return {"requests": len(self.results), "completed": len(done), "aborted": 0, "errors": len(errors),
                "error_samples": [repr(e)[:200] for e in errors[:3]]}


def wait_sparse_decoding(srv: ServerProcess, steps: int = 4, timeout_s: float = 120.0) -> None:
    base = stats(srv, 0).get("decode_steps", 0)
    wait_until(lambda: stats(srv, 0).get("decode_steps", 0) >= base + steps, timeout_s, 0.2)


def indexer_pid(srv: ServerProcess) -> int:
    return int(stats(srv, 0)["indexer_pid"])


def kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------- scenarios
def sigkill_once(srv: ServerProcess) -> dict:
    bg = Background(srv, 3, 500, 120, 100)
    wait_sparse_decoding(srv)
    pid = indexer_pid(srv)
    kill(pid)
    out = bg.join()
    out["recovered"] = wait_indexer(srv, not_pid=pid)
    return out


def sigkill_beyond_budget(srv: ServerProcess) -> dict:
    """More SIGKILLs than the restart budget (``max_restarts`` in ``restart_window_s``): down, then back once
    the window frees a restart."""
    bg = Background(srv, 3, 500, 200, 200)
    wait_sparse_decoding(srv)
    kills = 0
    pid = None
    for _ in range(FAULT_ICE["max_restarts"] + 1):
        if not wait_indexer(srv, "up", 60, not_pid=pid):
            break
        pid = indexer_pid(srv)
        kill(pid)
        kills += 1
    down = wait_indexer(srv, "down", 30)
    out = bg.join()
    out["kills"], out["down_seen"] = kills, down
    out["recovered"] = wait_indexer(srv, "up", FAULT_ICE["restart_window_s"] + 90, not_pid=pid)
    return out


def sigstop_5s(srv: ServerProcess) -> dict:
    bg = Background(srv, 3, 500, 120, 300)
    wait_sparse_decoding(srv)
    pid = indexer_pid(srv)
    kill(pid, signal.SIGSTOP)
    time.sleep(5.0)
    kill(pid, signal.SIGCONT)
    out = bg.join()
    out["recovered"] = wait_indexer(srv, not_pid=pid)
    return out


def restart_fails(srv: ServerProcess) -> dict:
    """Something sits where each allowed replacement's socket would be created: every restart fails, the
    indexer stays down (fallback selections) until the obstacle is gone and the window frees a restart."""
    st = stats(srv, 0)
    endpoint = Path(st["indexer_endpoint"][len("ipc://"):])
    rank, gen = endpoint.stem.split("-")[1], int(endpoint.stem.split("-")[-1])
    # every attempt a window allows, plus spares (a restart that failed earlier advanced the counter)
    planted = [endpoint.with_name(f"indexer-{rank}-{gen + k}.sock") for k in range(1, 2 * FAULT_ICE["max_restarts"] + 3)]
    for p in planted:
        p.mkdir()
    failed0 = st.get("failed_restarts", 0)
    bg = Background(srv, 3, 500, 200, 400)
    wait_sparse_decoding(srv)
    pid = indexer_pid(srv)
    kill(pid)
    down = wait_indexer(srv, "down", 90)
    out = bg.join()

    # Earlier scenarios on the same server may have spent the restart window: then no attempt runs until
    # the window frees one. The obstacles stay until an attempt has met them (poking, since the supervisor
    # acts at forward passes); removing them earlier let the first allowed restart simply succeed.
    def attempt_failed() -> bool:
        poke(srv)
        return stats(srv, 0.3).get("failed_restarts", 0) > failed0
    out["attempt_failed"] = wait_until(attempt_failed, FAULT_ICE["restart_window_s"] + 60, 1.0)
    for p in planted:
        shutil.rmtree(p, ignore_errors=True)
    out["down_seen"] = down
    out["recovered"] = wait_indexer(srv, "up", FAULT_ICE["restart_window_s"] + 90, not_pid=pid)
    return out


def disconnects_200(srv: ServerProcess) -> dict:
    rng = random.Random(7)
    jobs = [(token_ids(rng.randint(150, 400), 5000 + i % 40), rng.randint(4, 24),
             rng.randint(1, 6) if rng.random() < 0.25 else None) for i in range(200)]  # shared prefixes
    aborted_before = aborted_on_server(srv)
    results = stream_many(srv, jobs)
    time.sleep(2.0)
    errors = [r for r in results if r not in ("done", "aborted")]
    return {"requests": len(jobs), "completed": results.count("done"), "aborted": results.count("aborted"),
            "errors": len(errors), "error_samples": [repr(e)[:200] for e in errors[:3]],
            "server_aborts": aborted_on_server(srv) - aborted_before}


def aborted_on_server(srv: ServerProcess) -> float:
    """SGLang's own count of aborted requests (``sglang:num_aborted_requests_total``)."""
    text = srv.get("/metrics")["text"]
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("sglang:num_aborted_requests_total"))


def flush_during_decode(srv: ServerProcess) -> dict:
    bg = Background(srv, 3, 500, 100, 500)
    wait_sparse_decoding(srv)
    try:
        r = srv.post("/flush_cache", {}, timeout_s=30, key=srv.admin_key)
        flushed = str(r)
    except urllib.error.HTTPError as e:
        flushed = f"http {e.code}"  # SGLang refuses a flush while requests run
    out = bg.join()
    out["flush_reply"] = flushed[:120]
    return out


def absurd_budget(srv: ServerProcess) -> dict:
    out = {"refused": []}
    for bad in ({"budget_tokens": 1073741824}, {"budget_tokens": -5}, {"selection_deadline_ms": 1e12},
                {"selection_deadline_ms": 0}, {"query": {"fov": 1 << 62}}, {"query": {"prop_to_retrieve": 7}},
                {"sink_tokens": 0}, {"budget_tokens": "all"}, {"selection": "h2o"}):
        try:
            srv.set_icecache(key=srv.admin_key, **bad)
            out["refused"].append(False)
        except ValueError:
            out["refused"].append(True)
    bg = Background(srv, 2, 700, 60, 600)
    wait_sparse_decoding(srv)
    dense_before = stats(srv, 0).get("dense_rows", 0)
    big = srv.set_icecache(key=srv.admin_key, budget_tokens=FAULT_ICE["sink_tokens"] + FAULT_ICE["window_tokens"]
                           + 4096 * FAULT_ICE["page_size"])
    res = bg.join()
    out["largest_budget_accepted"] = big["config"]["budget_tokens"]
    out["dense_rows_after"] = stats(srv).get("dense_rows", 0) - dense_before
    srv.set_icecache(key=srv.admin_key, budget_tokens=FAULT_ICE["budget_tokens"])
    return res | out


def unauthorized_post(srv: ServerProcess) -> dict:
    """``POST /icecache/config`` without a key, with a wrong one and with the user key under an admin key is
    refused; only the right key changes settings."""
    codes = {}
    version = stats(srv, 0).get("config_version", 0)
    for who, key in (("none", ""), ("wrong", "not-the-key"), ("user", API_KEY), ("admin", ADMIN_KEY)):
        try:
            srv.set_icecache(key=key, budget_tokens=160)
            codes[who] = 200
        except PermissionError as e:
            codes[who] = int(str(e).split(":")[0])
    poke(srv)  # settings are applied at the next forward pass
    applied = stats(srv).get("config_version", 0) - version
    srv.set_icecache(key=srv.admin_key, budget_tokens=FAULT_ICE["budget_tokens"])
    return {"requests": 0, "completed": 0, "aborted": 0, "errors": 0, "post_status": codes,
            "versions_applied": applied}


def control_files(srv: ServerProcess) -> dict:
    """Files in the run directory the server did not write: malformed, naming launch-only keys, a symlink;
    and the old shared location. None changes a setting; the server keeps serving."""
    poke(srv)  # settings an earlier scenario posted are applied at the next forward pass...
    st0 = stats(srv)  # ...and reach the snapshot within the publisher's period: compare with that state
    run_dir = Path(srv.get("/icecache/stats")["run_dir"])
    mode = oct(run_dir.stat().st_mode & 0o777)
    ctl = run_dir / "control.json"
    before = (st0["config_version"], st0["budget_tokens"], st0["selection"])
    target = run_dir.parent / f"planted-{os.getpid()}.json"
    planted = [b"{not json", json.dumps({"version": 10**6, "settings": {"sink_tokens": 0, "window_tokens": 0,
                                                                        "dense_layers": 3}}).encode(),
               json.dumps({"version": 10**6, "config": {"budget_tokens": 999}}).encode(), None]
    old_dir = Path("/tmp") / f"icecache-stats-{os.getuid()}"  # where a control file used to be honoured
    old_dir.mkdir(exist_ok=True)
    (old_dir / f"control-{srv.port}.json").write_text(json.dumps({"version": 10**6, "config": {"budget_tokens": 999}}))
    seen = []
    try:
        for body in planted:
            ctl.unlink(missing_ok=True)
            if body is None:  # a symlink to a valid-looking file elsewhere
                target.write_text(json.dumps({"version": 10**6, "settings": {"budget_tokens": 999}}))
                ctl.symlink_to(target)
            else:
                ctl.write_bytes(body)
            r = srv.generate(input_ids=token_ids(300, 77), max_new_tokens=6)
            st = stats(srv)
            seen.append((st["config_version"], st["budget_tokens"], st["selection"]) == before
                        and r["meta_info"]["completion_tokens"] == 6)
    finally:
        ctl.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        (old_dir / f"control-{srv.port}.json").unlink(missing_ok=True)
    ok = srv.set_icecache(key=srv.admin_key, budget_tokens=FAULT_ICE["budget_tokens"])  # the real route still works
    srv.generate(input_ids=token_ids(300, 78), max_new_tokens=2)
    applied = stats(srv).get("config_version") == ok["version"]
    return {"requests": len(planted), "completed": sum(seen), "aborted": 0, "errors": len(planted) - sum(seen),
            "run_dir_mode": mode, "unchanged_after_each_file": seen, "post_after_applied": applied}


def fuzz_300(srv: ServerProcess) -> dict:
    import numpy as np
    import zmq

    from icecache_sglang.indexer import protocol as p
    from icecache_sglang.indexer.fuzz import fuzzed_messages

    st = stats(srv, 0)
    errors0 = (st.get("indexer") or {}).get("errors", 0)
    bg = Background(srv, 3, 500, 80, 700)
    wait_sparse_decoding(srv)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(st["indexer_endpoint"])
    msgs = fuzzed_messages(np.random.default_rng(11), 300, head_dim=32)
    for frames in msgs:
        sock.send_multipart(frames)
    replies = []
    while len(replies) < len(msgs) and sock.poll(30000):
        replies.append(p.decode_reply(sock.recv_multipart())[0])
    sock.close(0)
    out = bg.join()
    after = stats(srv)
    out["fuzzed_sent"], out["fuzzed_error_replies"] = len(msgs), sum(not r.ok for r in replies)
    out["indexer_errors_counted"] = (after.get("indexer") or {}).get("errors", 0) - errors0
    out["same_indexer"] = after.get("indexer_pid") == st.get("indexer_pid")
    return out


@dataclass
class Scenario:
    name: str
    run: Callable[[ServerProcess], dict]
    admin: bool = False  # needs the server with --admin-api-key
    notes: str = ""
    extra: dict = field(default_factory=dict)


SCENARIOS = [
    Scenario("sigkill_once", sigkill_once),
    Scenario("sigkill_beyond_budget", sigkill_beyond_budget),
    Scenario("sigstop_5s", sigstop_5s),
    Scenario("restart_fails", restart_fails),
    Scenario("disconnects_200", disconnects_200),
    Scenario("flush_during_decode", flush_during_decode),
    Scenario("absurd_budget", absurd_budget),
    Scenario("unauthorized_post", unauthorized_post, admin=True),
    Scenario("control_files", control_files),
    Scenario("fuzz_300", fuzz_300),
]
BY_NAME = {s.name: s for s in SCENARIOS}

COUNTERS = ("fallbacks", "indexer_restarts", "failed_restarts", "stuck_kills", "timed_out_steps", "unsent_writes")


def run_scenario(srv: ServerProcess, sc: Scenario) -> dict:
    """One scenario on a running fault server, framed by the checks every scenario must pass."""
    before_answer = fixed_answer(srv)
    pids = server_pids(srv)
    s0 = stats(srv, 0)
    t0 = time.monotonic()
    rec = {"scenario": sc.name, **sc.run(srv)}
    rec["seconds"] = round(time.monotonic() - t0, 2)
    rec["server_alive"] = alive(srv)
    s1 = stats(srv)
    for c in COUNTERS:
        rec[c if c != "indexer_restarts" else "restarts"] = s1.get(c, 0) - s0.get(c, 0)
    rec["indexer_state_after"] = s1.get("indexer_state")
    rec.update(leaks(srv, pids))
    after_answer = fixed_answer(srv) if rec["server_alive"] else None
    rec["answer_unchanged"] = after_answer == before_answer
    rec["ok"] = bool(rec["server_alive"] and rec["errors"] == 0
                     and rec["completed"] == rec["requests"] - rec["aborted"]
                     and rec["leaked_sequences"] == 0 and rec["leaked_index_bytes"] == 0
                     and rec["leaked_shm_entries"] == 0 and rec["answer_unchanged"])
    return rec


TABLE = ("scenario", "requests", "completed", "aborted", "errors", "server_alive", "fallbacks", "restarts",
         "failed_restarts", "stuck_kills", "timed_out_steps", "leaked_sequences", "leaked_index_bytes",
         "leaked_shm_entries", "answer_unchanged", "seconds", "ok")


def table(records: list[dict]) -> str:
    """The README's table."""
    rows = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in records:
        rows.append("| " + " | ".join(str(r.get(k, "")) for k in TABLE) + " |")
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scenario"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.5), sharey=True)
    y = range(len(names))
    axes[0].barh(y, [r.get("seconds", 0) for r in records],
                 color=["tab:green" if r.get("ok") else "tab:red" for r in records])
    axes[0].set_xlabel("seconds (green: every check passed)")
    axes[0].set_yticks(list(y), names)
    axes[1].barh(y, [r.get("fallbacks", 0) for r in records], color="tab:orange")
    for i, r in enumerate(records):
        axes[1].text(r.get("fallbacks", 0), i, f"  restarts {r.get('restarts', 0)}, stuck {r.get('stuck_kills', 0)}, "
                     f"failed {r.get('failed_restarts', 0)}", va="center", fontsize=8)
    axes[1].set_xlabel("selections that fell back (recent pages)")
    meta = records[0] if "machine" in records[0] else {"machine": machine(), "command": command()}
    fig.suptitle(f"IceCache fault scenarios through real SGLang servers (CPU, tiny model)\n{meta['machine']}; "
                 f"{meta['command']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="share two servers between the scenarios")
    ap.add_argument("--scenarios", nargs="*", choices=list(BY_NAME), default=None)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--logs", default="/tmp/icecache-faults")
    ap.add_argument("--table", metavar="JSON", help="print the README table of a results file and exit")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG of a results file and exit")
    args = ap.parse_args(argv)
    if args.table or args.replot:
        path = Path(args.table or args.replot)
        recs = json.loads(path.read_text())
        if args.table:
            print(table(recs))
        else:
            plot(recs, path.with_suffix(".png"))
        return 0
    todo = [BY_NAME[n] for n in args.scenarios] if args.scenarios else SCENARIOS
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    records, shared = [], {}
    try:
        for sc in todo:
            if args.quick:
                srv = shared.get(sc.admin) or shared.setdefault(sc.admin, start_server(
                    logs / f"shared-{'admin' if sc.admin else 'user'}.log", admin=sc.admin))
            else:
                srv = start_server(logs / f"{sc.name}.log", admin=sc.admin)
            pids = server_pids(srv)
            try:
                rec = run_scenario(srv, sc)
            except Exception as e:  # noqa: BLE001 - a scenario that breaks the frame is a failed record
                rec = {"scenario": sc.name, "ok": False, "server_alive": alive(srv), "failure": repr(e)[:500]}
            finally:
                if not args.quick:
                    pids |= server_pids(srv)
                    srv.stop()
            if not args.quick:  # a stopped server leaves no private directory behind (its reaper polls)
                wait_until(lambda: not stale_dirs(pids), 5.0, 0.1)
                rec["left_after_stop"] = stale_dirs(pids)
                rec["ok"] = rec.get("ok", False) and not rec["left_after_stop"]
            rec["server"] = "shared" if args.quick else "fresh"
            records.append(rec)
            print(json.dumps(rec), flush=True)
    finally:
        for srv in shared.values():
            srv.stop()
    path = write_records(args.name, args.quick, records)
    plot(records, png_path(args.name, args.quick))
    print(table(records))
    print(f"{sum(r.get('ok', False) for r in records)}/{len(records)} scenarios ok -> {path}")
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
