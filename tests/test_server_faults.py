"""Faults through real SGLang servers on CPU (``benchmarks/faults.py``'s scenarios, each framed by its checks:
server alive, every request not aborted completed, nothing leaked after ``flush_cache``, the same answer to a
fixed prompt before and after), plus the admin auth level of ``POST /icecache/config``, keys stored for a
model that writes its KV itself (``save_kv_cache=False``), and models IceCache refuses at launch.

The scenarios share one server (``--api-key``, a 30 s restart window) in the order ``SCENARIOS`` lists them;
each leaves it as it found it, which the frame checks. The benchmark runs each on a fresh server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sglang_servers import LOG_DIR, TINY_ICE, icecache_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # noqa: E402

from icecache_sglang.launch import ServerProcess, server_env  # noqa: E402
from icecache_sglang.models.tiny import ensure_tiny_swa_model  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_srv():
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    srv = faults.start_server(LOG_DIR / "faults_user.log")
    try:
        yield srv
    finally:
        srv.stop()


def run(srv, name: str) -> dict:
    rec = faults.run_scenario(srv, faults.BY_NAME[name])
    print(json.dumps(rec))
    assert rec["ok"], rec
    return rec


def test_indexer_sigkill_once_mid_decode(fault_srv):
    rec = run(fault_srv, "sigkill_once")
    assert rec["restarts"] == 1 and rec["recovered"] and rec["fallbacks"] > 0
    log = fault_srv.log_path.read_text(errors="replace")
    assert "the indexer process is dead (exit code -9); restarting" in log


def test_indexer_sigkilled_beyond_the_restart_budget(fault_srv):
    rec = run(fault_srv, "sigkill_beyond_budget")
    assert rec["kills"] == faults.FAULT_ICE["max_restarts"] + 1
    assert rec["down_seen"] and rec["recovered"]  # down while the budget was spent, back once the window freed
    assert rec["restarts"] >= faults.FAULT_ICE["max_restarts"] + 1


def test_indexer_stopped_for_5s(fault_srv):
    rec = run(fault_srv, "sigstop_5s")
    assert rec["stuck_kills"] == 1 and rec["restarts"] == 1
    # each timed-out step waited one deadline, and the indexer was replaced after a few of them
    assert 1 <= rec["timed_out_steps"] <= 2 * faults.FAULT_ICE["max_restarts"] + 3


def test_restart_that_fails(fault_srv):
    rec = run(fault_srv, "restart_fails")
    # every allowed attempt failed (earlier scenarios on this server may have used some of the window)
    assert rec["down_seen"] and rec["failed_restarts"] >= 1 and rec["recovered"]


def test_200_concurrent_streams_with_25_percent_disconnects(fault_srv):
    rec = run(fault_srv, "disconnects_200")
    assert rec["completed"] >= 140 and rec["aborted"] >= 30
    assert rec["server_aborts"] >= 1  # the disconnects reached the scheduler as aborts


def test_flush_cache_during_decode(fault_srv):
    rec = run(fault_srv, "flush_during_decode")
    assert rec["completed"] == rec["requests"]


def test_absurd_and_largest_budgets(fault_srv):
    rec = run(fault_srv, "absurd_budget")
    assert all(rec["refused"]), rec["refused"]
    assert rec["largest_budget_accepted"] == 65568
    assert rec["dense_rows_after"] > 0  # requests shorter than the new budget decoded densely


def test_control_files_the_server_did_not_write(fault_srv):
    rec = run(fault_srv, "control_files")
    assert rec["run_dir_mode"] == "0o700" and all(rec["unchanged_after_each_file"]) and rec["post_after_applied"]
    log = fault_srv.log_path.read_text(errors="replace")
    assert "control file refused, settings unchanged" in log


def test_fuzzed_indexer_messages_while_serving(fault_srv):
    rec = run(fault_srv, "fuzz_300")
    assert rec["fuzzed_error_replies"] == rec["fuzzed_sent"] == 300 and rec["same_indexer"]


def test_config_route_needs_the_api_key(fault_srv):
    """``--api-key`` alone: POST /icecache/config takes that key and nothing else."""
    v0 = fault_srv.set_icecache(key=faults.API_KEY, budget_tokens=faults.FAULT_ICE["budget_tokens"])["version"]
    for key in ("", "not-the-key"):
        with pytest.raises(PermissionError, match="401"):
            fault_srv.set_icecache(key=key, budget_tokens=160)
    r = fault_srv.set_icecache(key=faults.API_KEY, budget_tokens=faults.FAULT_ICE["budget_tokens"])
    assert r["version"] == v0 + 1  # the refused POSTs published nothing
    fault_srv.generate(input_ids=faults.token_ids(20, 1), max_new_tokens=2)
    st = fault_srv.icecache_stats()
    assert st["config_version"] == r["version"] and st["budget_tokens"] == faults.FAULT_ICE["budget_tokens"]


# ---------------------------------------------------------------------------------------------- model paths
def fused_kv_model(tmp: Path) -> Path:
    """The fault servers' tiny Llama under an architecture that writes K/V itself (tests/fused_kv_models)."""
    src = faults.fault_model()
    for f in src.iterdir():
        if f.name != "config.json":
            (tmp / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FusedKVWriteLlamaForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.fixture(scope="module")
def fused_admin(tmp_path_factory):
    """The fused-KV-write model with ``--api-key`` and ``--admin-api-key``."""
    model = fused_kv_model(tmp_path_factory.mktemp("fused"))
    env = server_env()
    env["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "fused_kv_models"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    args = icecache_args(TINY_ICE, "--api-key", faults.API_KEY, "--admin-api-key", faults.ADMIN_KEY)
    srv = ServerProcess(model, args, log_path=LOG_DIR / "faults_fused_admin.log", env=env, api_key=faults.API_KEY)
    srv.admin_key = faults.ADMIN_KEY
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_config_route_is_admin_only_under_an_admin_key(fused_admin):
    rec = faults.unauthorized_post(fused_admin)
    assert rec["post_status"] == {"none": 401, "wrong": 401, "user": 401, "admin": 200}
    assert rec["versions_applied"] == 1


def test_keys_are_indexed_for_a_model_that_writes_its_kv_itself(fused_admin, fault_srv):
    """The fused model passes ``save_kv_cache=False``: its keys still reach the index, so it decodes exactly
    like the same weights on the ordinary path (``fault_srv``: same IceCache layout; same keys -> same index
    -> same pages). An index over the zeros of an unwritten key store selects arbitrary pages and the
    answers drift apart."""
    assert "FusedKVWriteLlamaForCausalLM" in fused_admin.log_path.read_text(errors="replace")
    a0, b0 = fused_admin.icecache_stats(wait_s=0), fault_srv.icecache_stats(wait_s=0)
    keys = key_store(a0)
    written0 = int(keys.any(axis=(2, 3)).sum())
    for seed in (1, 2, 3):
        ids = faults.token_ids(700, 9000 + seed)
        a = fused_admin.generate(input_ids=ids, max_new_tokens=40)
        b = fault_srv.generate(input_ids=ids, max_new_tokens=40)
        assert a["text"] == b["text"], seed
    a1, b1 = fused_admin.icecache_stats(), fault_srv.icecache_stats()
    assert a1["sparse_rows"] - a0["sparse_rows"] == b1["sparse_rows"] - b0["sparse_rows"] >= 3 * 39
    assert a1["fallbacks"] == a0["fallbacks"]
    # the key store itself: every layer (all are anchors here) holds keys for the 3 x (700 + 40) new tokens
    written = keys.any(axis=(2, 3)).sum(axis=1)
    assert (written >= 3 * 700).all() and int(written.sum()) - written0 >= 4 * 3 * 700, written


def key_store(snapshot: dict):
    """The rank's key store, mapped read-only (it lives beside the indexer's socket in the private dir)."""
    import numpy as np

    from icecache_sglang.indexer.keystore import KeyStore, KeyStoreSpec

    path = Path(snapshot["indexer_endpoint"][len("ipc://"):]).parent / f"keys-r{snapshot['rank']}.shm"
    layers, heads, dim = 4, 2, 32
    slots = path.stat().st_size // (layers * heads * dim * 4)
    store = KeyStore.attach(KeyStoreSpec(str(path), "float32", layers, slots, heads, dim))
    return np.asarray(store.keys)


def test_sliding_window_model_is_refused_at_launch():
    cmd = ServerProcess(ensure_tiny_swa_model(), icecache_args(TINY_ICE)).command()
    p = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=600, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "--enable-icecache cannot serve this model: sliding-window attention (window" in out
