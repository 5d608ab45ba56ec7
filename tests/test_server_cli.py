"""--enable-icecache / --icecache-config on SGLang's real argument parser (through the plugin entry point),
and a real launch that fails with the reason."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

pytest.importorskip("sglang", reason="the server tests need the 'server' set-up (scripts/setup.sh)")

from icecache_sglang.launch import server_env
from icecache_sglang.runtime.config import DEFAULT_DEVICE_LANES, ENV_VAR, IceCacheConfig
from icecache_sglang.runtime.rundir import ENV_RUN_DIR


@pytest.fixture(scope="module")
def parse(tmp_path_factory):
    """prepare_server_args with the plugin loaded, as `python -m sglang.launch_server` does."""
    os.environ.update({k: v for k, v in server_env().items() if k == "SGLANG_USE_CPU_ENGINE"})
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text("{}")

    def run(*argv):
        return prepare_server_args(["--model-path", str(model), *argv])

    yield run
    os.environ.pop(ENV_VAR, None)


def fails(parse, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_plain_launch_is_untouched(parse):
    args = parse()
    assert args.attention_backend is None
    assert ENV_VAR not in os.environ


def test_enable_icecache_selects_backend_and_exports_config(parse):
    cfg = {"budget_tokens": 512, "window_tokens": 64}
    args = parse("--enable-icecache", "--icecache-config", json.dumps(cfg))
    assert args.attention_backend == "icecache"
    # the server's private run directory, for its HTTP process and schedulers (stats, control)
    run_dir = os.environ[ENV_RUN_DIR]
    st = os.lstat(run_dir)
    assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()
    got = IceCacheConfig.from_json(os.environ[ENV_VAR])
    assert (got.budget_tokens, got.window_tokens) == (512, 64)
    # decode selects pages on the host between layers: SGLang's decode graphs are off, as for torch_native
    assert args.disable_cuda_graph
    parse()  # a later plain launch in the same process forgets it
    assert ENV_VAR not in os.environ


@pytest.mark.parametrize("argv, needle", [
    (["--enable-icecache", "--icecache-config", '{"budget_tokens": 40}'], "budget_tokens (40) must exceed"),
    (["--enable-icecache", "--icecache-config", '{"budget": 512}'], "unknown --icecache-config key(s) ['budget']"),
    (["--enable-icecache", "--icecache-config", "{not json"], "not valid JSON"),
    (["--icecache-config", "{}"], "--enable-icecache is not"),
    (["--enable-icecache", "--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--enable-icecache", "--attention-backend", "fa3"], "--attention-backend fa3: IceCache runs prefill"),
    # SGLang's GPU backends run IceCache's dense attention on a GPU only
    (["--enable-icecache", "--attention-backend", "triton"], "dense_attention 'triton' needs a CUDA GPU"),
    (["--enable-icecache", "--attention-backend", "flashinfer"], "dense_attention 'flashinfer' needs a CUDA GPU"),
    (["--enable-icecache", "--attention-backend", "triton", "--icecache-config", '{"dense_attention": "flashinfer"}'],
     "--attention-backend triton and dense_attention 'flashinfer' disagree"),
    (["--enable-icecache", "--icecache-config", '{"dense_attention": "fa3"}'], "dense_attention must be one of"),
    (["--enable-icecache", "--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--enable-icecache", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    (["--enable-icecache", "--icecache-config", '{"decode_attention": "cuda"}'], "decode_attention must be one of"),
    (["--enable-icecache", "--icecache-config", '{"decode_attention": "flashinfer"}'], "needs a CUDA GPU"),
    (["--enable-icecache", "--icecache-config", '{"decode_attention": "triton"}'], "decode_attention 'triton' needs a CUDA GPU"),
    (["--enable-icecache", "--icecache-config", '{"selection": "h2o"}'], "selection must be one of"),
    (["--enable-icecache", "--icecache-config", '{"budget_tokens": 1073741824}'],
     "budget_tokens (1073741824) asks for 67108860 pages per KV head; the indexer selects at most 4096"),
    (["--enable-icecache", "--icecache-config", '{"selection_deadline_ms": 1e9}'], "selection_deadline_ms must be"),
    (["--enable-icecache", "--icecache-config", '{"query": {"fov": 4611686018427387904}}'], "fov must be an int in"),
    (["--enable-icecache", "--icecache-config", '{"max_restarts": -1}'], "max_restarts must be"),
    (["--enable-icecache", "--prefill-attention-backend", "torch_native"],
     "--prefill-attention-backend torch_native: IceCache runs both prefill and decode"),
    (["--enable-icecache", "--decode-attention-backend", "triton"], "--decode-attention-backend triton"),
    (["--enable-icecache", "--enable-mixed-chunk"], "--enable-mixed-chunk: decode requests batched"),
    # the offloaded decode: no dense layer, a device pool of at least one lane, no more requests than lanes
    (["--enable-icecache", "--icecache-config", '{"offload": true, "dense_layers": 2}'], "set it to 0 (it is 2)"),
    (["--enable-icecache", "--icecache-config", '{"offload": true, "dense_layers": 0, "device_kv_tokens": 100}'],
     "device_kv_tokens (100) holds no lane: one decoding request needs 272 rows (budget_tokens + page_size + "
     "the selections' staleness, max(step_reuse - 1, max_stale_steps)); the smallest working size is 272"),
    (["--enable-icecache", "--icecache-config", '{"device_kv_tokens": 1000}'], "set offload: true"),
    (["--enable-icecache", "--icecache-config", '{"offload": "yes", "dense_layers": 0}'], "offload must be true or false"),
    # SGLang's KV pool in host memory: no more than the host has (checked before any rank allocates)
    (["--enable-icecache", "--icecache-config", '{"offload": true, "dense_layers": 0, "host_kv_gb": 60000}'],
     "host_kv_gb 60000 GiB x 1 rank(s) is more than 90% of the host's available memory"),
    (["--enable-icecache", "--tp-size", "2", "--icecache-config",
      '{"offload": true, "dense_layers": 0, "host_kv_gb": 30000}'],
     "host_kv_gb 30000 GiB x 2 rank(s) is more than 90% of the host's available memory"),
    (["--enable-icecache", "--enable-page-major-kv-layout"], "--enable-page-major-kv-layout: IceCache's KV pool"),
    # a decode server's rows are freed without SGLang's row hooks (indexes and lanes would leak)
    (["--enable-icecache", "--disaggregation-mode", "decode"], "--disaggregation-mode decode: prefill/decode"),
    # graphs asked for explicitly outrank the launch's disable_cuda_graph: refused, not a NotImplementedError
    (["--enable-icecache", "--cuda-graph-backend-decode", "full"], "--cuda-graph-backend-decode full: IceCache's"),
    (["--enable-icecache", "--cuda-graph-backend-prefill", "breakable"], "--cuda-graph-backend-prefill breakable"),
    (["--enable-icecache", "--cuda-graph-config", '{"decode": {"backend": "full"}}'],
     "--cuda-graph-config asks for CUDA graphs (decode)"),
    (["--enable-icecache", "--enable-streaming-session", "--icecache-config", '{"offload": true}'],
     "--enable-streaming-session with offload: each open session holds one of SGLang's request rows"),
    (["--enable-icecache", "--max-running-requests", "8", "--icecache-config",
      '{"offload": true, "dense_layers": 0, "device_kv_tokens": 1000}'],
     "--max-running-requests 8: the offloaded decode's device pool holds 3 requests (device_kv_tokens 1000 // 272 "
     "rows each); raise device_kv_tokens to 2176"),
])
def test_bad_flags_fail_with_the_reason(parse, capsys, argv, needle):
    err = fails(parse, capsys, *argv)
    assert err.startswith("sglang: error: ")
    assert needle in err


def test_real_launch_with_a_bad_flag_exits_at_once_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path), "--enable-icecache",
           "--icecache-config", '{"budget_tokens": 64, "sink_tokens": 32, "window_tokens": 32}']
    p = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2
    assert "sglang: error: --icecache-config: budget_tokens (64) must exceed" in p.stderr


def test_attention_backend_names_icecaches_dense_backend(parse):
    """``--attention-backend X`` with IceCache: X runs prefill and the dense attention (dense_attention)."""
    args = parse("--enable-icecache", "--attention-backend", "torch_native")
    assert args.attention_backend == "icecache"
    assert IceCacheConfig.from_json(os.environ[ENV_VAR]).dense_attention == "torch_native"
    parse("--enable-icecache")
    assert IceCacheConfig.from_json(os.environ[ENV_VAR]).dense_attention == "auto"


def test_dense_attention_resolves_per_device():
    from icecache_sglang.runtime.attention import flashinfer_importable
    from icecache_sglang.runtime.dense import resolve_dense_attention

    assert resolve_dense_attention("auto", "cpu") == "torch_native"
    assert resolve_dense_attention("auto", "cuda") == ("flashinfer" if flashinfer_importable() else "triton")
    assert resolve_dense_attention("triton", "cuda") == "triton"
    with pytest.raises(ValueError, match="needs the KV cache on a CUDA device"):
        resolve_dense_attention("triton", "cpu")


def test_offload_runs_as_many_requests_as_the_device_pool_holds(parse):
    cfg = {"offload": True, "dense_layers": 0, "device_kv_tokens": 1000}
    args = parse("--enable-icecache", "--icecache-config", json.dumps(cfg))
    assert args.max_running_requests == 3  # 1000 rows // (256 + 16) per request
    args = parse("--enable-icecache", "--max-running-requests", "2", "--icecache-config", json.dumps(cfg))
    assert args.max_running_requests == 2
    # without device_kv_tokens: the default lane count, never SGLang's own (thousands of lanes)
    args = parse("--enable-icecache", "--icecache-config", json.dumps({"offload": True, "dense_layers": 0}))
    assert args.max_running_requests == DEFAULT_DEVICE_LANES


def test_graphs_switched_off_explicitly_are_accepted(parse):
    parse("--enable-icecache", "--cuda-graph-backend-decode", "disabled")
    parse("--enable-icecache", "--cuda-graph-config", '{"decode": {"backend": "disabled"}}')


def test_breakable_decode_graphs_are_accepted_and_prefill_stays_without(parse):
    """SGLang's breakable decode graphs capture the layers around their attention, which runs eagerly between
    the segments (the host selects pages there): accepted, and they outrank the launch's disable_cuda_graph
    for decode only."""
    args = parse("--enable-icecache", "--cuda-graph-backend-decode", "breakable")
    # SGLang's precedence (arg_groups/cuda_graph_hook.py): the per-phase flag over disable_cuda_graph
    assert args.cuda_graph_backend_decode == "breakable" and args.disable_cuda_graph
    assert args.cuda_graph_backend_prefill in (None, "disabled")
    parse("--enable-icecache", "--cuda-graph-config", '{"decode": {"backend": "breakable"}}')


def test_breakable_prefill_graphs_and_the_metadata_glue_graph_are_refused(parse, capsys, monkeypatch):
    err = fails(parse, capsys, "--enable-icecache", "--cuda-graph-config", '{"prefill": {"backend": "breakable"}}')
    assert "--cuda-graph-config asks for CUDA graphs (prefill) IceCache cannot run under" in err
    monkeypatch.setenv("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "1")
    err = fails(parse, capsys, "--enable-icecache", "--cuda-graph-backend-decode", "breakable")
    assert "SGLANG_ENABLE_METADATA_GLUE_GRAPH would capture IceCache's per-step selection" in err


def test_host_ranks_count_the_schedulers_on_this_host():
    """The default host_kv_gb splits the host among its schedulers: TP x DP of them, but with DP attention the
    DP groups share the TP ranks (it was TP x DP there too: a DP-times smaller default)."""
    from types import SimpleNamespace as A

    from icecache_sglang.patches.cli import host_ranks

    assert host_ranks(A(tp_size=2, dp_size=4)) == 8
    assert host_ranks(A(tp_size=8, dp_size=8, enable_dp_attention=True)) == 8
    assert host_ranks(A(tp_size=8, dp_size=1, attn_dp_size=4)) == 8
    assert host_ranks(A(tp_size=8, dp_size=2, nnodes=2)) == 8
    assert host_ranks(A()) == 1


def test_offload_without_host_kv_gb_keeps_sglangs_sizing_without_a_gpu(parse):
    """On a machine without a GPU SGLang's pool is host memory already: no host_kv_gb is filled in (on a GPU the
    launcher fills in half the available memory, the same figure for every rank)."""
    parse("--enable-icecache", "--icecache-config", json.dumps({"offload": True, "dense_layers": 0}))
    assert json.loads(os.environ[ENV_VAR])["host_kv_gb"] is None
