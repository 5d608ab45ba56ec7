"""IceCache under SGLang's breakable decode CUDA graphs (``--cuda-graph-backend-decode breakable``), their
replay emulated on the CPU by ``tests/graph_replay`` in a real server: a capture of a dummy batch of each
size, then every decode step padded by three rows, its metadata from SGLang's replay view, the attention
eager between the (here unrecorded) segments. The tiny model runs at ``SENSITIVE_GAIN``, where its greedy
answers depend on the tokens attention reads (its sparse answers differ from its dense ones), and its answers
must equal the eager server's token for token, decoding sparsely with selections from the index. What a CPU
cannot show (which ops a CUDA graph records, its speed): the GPU test at the end, and
``benchmarks/gpu/serve_gpu.py --modes icecache-graphs``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sglang_servers import LOG_DIR, TINY_ICE, icecache_args, server_fixture

from icecache_sglang.launch import ServerProcess, server_env
from icecache_sglang.models.tiny import SENSITIVE_GAIN, ensure_tiny_model
from icecache_sglang.runtime.config import IceCacheConfig

pytestmark = pytest.mark.slow


def sensitive_model():
    return ensure_tiny_model(attention_gain=SENSITIVE_GAIN)


#: the eager reference: the same model and settings, SGLang's own eager decode runner
tiny_ref = server_fixture("tiny_sensitive_eager", sensitive_model, icecache_args(TINY_ICE))
ASYNC = {"max_stale_steps": 2}
#: offload (SGLang's pool in host memory, decode from a device pool of 3 lanes), as test_server_offload.py's
OFFLOAD = {**TINY_ICE, "offload": True, "device_kv_tokens": 3 * IceCacheConfig(**TINY_ICE).lane_rows,
           "host_kv_gb": 0.05}


def graph_server(name: str, cfg: dict, *args: str) -> ServerProcess:
    env = server_env()
    env["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "graph_replay"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    # the flag a GPU launch takes: on the CPU SGLang resolves it and runs no graph (the emulation replays)
    srv = ServerProcess(sensitive_model(), icecache_args(cfg, "--cuda-graph-backend-decode", "breakable", *args),
                        log_path=LOG_DIR / f"{name}.log", env=env)
    return srv.start()


@pytest.fixture(scope="module")
def tiny_graphs():
    srv = graph_server("tiny_graphs", TINY_ICE)
    yield srv
    srv.stop()


def token_ids(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def replays(srv: ServerProcess) -> int:
    lines = [ln for ln in srv.log_path.read_text().splitlines() if "emulated breakable-graph replays" in ln]
    return int(lines[-1].split("graph_replay: ")[1].split()[0]) if lines else 0


def test_graph_replays_decode_sparsely_and_answer_as_the_eager_server(tiny_graphs, tiny_ref):
    before = tiny_graphs.icecache_stats(wait_s=0)
    for i, n in enumerate((300, 700, 1200)):
        ids = token_ids(n, 40 + i)
        got = tiny_graphs.generate(input_ids=ids, max_new_tokens=16)
        want = tiny_ref.generate(input_ids=ids, max_new_tokens=16)
        assert got["output_ids"] == want["output_ids"], n
    st = tiny_graphs.icecache_stats()
    assert st["sparse_rows"] - before.get("sparse_rows", 0) >= 3 * 15  # every step after the first of each
    assert st["queries"] > before.get("queries", 0) and st["fallbacks"] == 0
    assert replays(tiny_graphs) >= 10  # the emulated graph path ran (its log line at the 1st, 10th, 100th)
    # the launch resolved the flag as a GPU's would: breakable decode graphs, prefill without graphs
    log = tiny_graphs.log_path.read_text()
    assert "'cuda_graph_config': {'decode': {'backend': 'breakable'" in log
    assert "prefill.backend='disabled'" in log


def test_a_batch_of_requests_in_graph_replays_answers_as_each_alone(tiny_graphs):
    """Several requests in one padded graph batch, some sparse and some within the budget: each answers as it
    does alone (the padding rows and the batch's other rows change nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [token_ids(n, 70 + i) for i, n in enumerate((90, 400, 650, 1000))]
    alone = []
    for ids in jobs:  # each from an empty radix cache, as the batch below (a prefix hit reuses an index)
        tiny_graphs.post("/flush_cache", {})
        alone.append(tiny_graphs.generate(input_ids=ids, max_new_tokens=12)["output_ids"])
    tiny_graphs.post("/flush_cache", {})
    with ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(lambda ids: tiny_graphs.generate(input_ids=ids, max_new_tokens=12)["output_ids"], jobs))
    assert together == alone


def test_asynchronous_selection_in_graph_replays(tiny_graphs):
    tiny_graphs.set_icecache(**ASYNC)
    try:
        before = tiny_graphs.icecache_stats(wait_s=0)
        r = tiny_graphs.generate(input_ids=token_ids(900, 90), max_new_tokens=24)
        assert r["meta_info"]["completion_tokens"] == 24
        st = tiny_graphs.icecache_stats()
        assert st["sparse_rows"] - before.get("sparse_rows", 0) >= 23 and st["fallbacks"] == 0
        # the default while_indexing (dense): a new prompt decodes densely while its index is built and its
        # first selections are fetched by the dense layers' queries (priming), then sparsely
        tiny_graphs.set_icecache(while_indexing="dense")
        before = tiny_graphs.icecache_stats(wait_s=0)
        r = tiny_graphs.generate(input_ids=token_ids(1500, 91), max_new_tokens=40)
        assert r["meta_info"]["completion_tokens"] == 40
        st = tiny_graphs.icecache_stats()
        assert st["primed_rows"] > before.get("primed_rows", 0)
        assert st["sparse_rows"] > before.get("sparse_rows", 0) and st["fallbacks"] == 0
    finally:
        tiny_graphs.set_icecache(max_stale_steps=0, while_indexing="wait")


@pytest.fixture(scope="module")
def tiny_offload_graphs():
    srv = graph_server("tiny_offload_graphs", OFFLOAD, "--context-length", "4096")
    yield srv
    srv.stop()


def test_offload_in_graph_replays_answers_as_the_eager_server(tiny_offload_graphs, tiny_ref):
    """The offloaded decode (lanes of a device pool, rows loaded from the host pool) in graph replays: the
    padding rows take no lane, and the answers are the eager IceCache server's (offload changes no token)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [token_ids(n, 110 + i) for i, n in enumerate((500, 800, 1300))]
    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda ids: tiny_offload_graphs.generate(input_ids=ids, max_new_tokens=12)["output_ids"],
                          jobs))
    want = []
    for ids in jobs:
        tiny_ref.post("/flush_cache", {})
        want.append(tiny_ref.generate(input_ids=ids, max_new_tokens=12)["output_ids"])
    assert got == want
    st = tiny_offload_graphs.icecache_stats()
    assert st["device_kv_bytes_loaded_total"] > 0 and st["fallbacks"] == 0
    assert replays(tiny_offload_graphs) >= 10


def gpu_llama(folder: Path) -> Path:
    """A tiny seeded Llama made on the spot (the GPU machine reaches no model hub): head_dim 64 for FlashInfer's
    decode, 4 layers, 4 query / 2 KV heads, served in bfloat16 with token ids in and out; scaled as the tiny
    test model is at ``SENSITIVE_GAIN``, so that its greedy answers depend on the tokens attention reads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from icecache_sglang.models.tiny import scale_weights

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    scale_weights(model, SENSITIVE_GAIN)
    model.save_pretrained(folder)
    return folder


@pytest.mark.skipif(not __import__("icecache_sglang.launch", fromlist=["has_cuda"]).has_cuda(),
                    reason="CUDA graphs need a GPU (the CPU tests above emulate their replay)")
def test_breakable_decode_graphs_on_a_gpu_answer_as_eager_decode(tmp_path):
    """On a GPU: SGLang's breakable decode graphs captured (batch sizes 1 and 4) and replayed, against eager
    decode: sparse requests one at a time answer token for token alike (batch 1 has the same shapes in both;
    the model's answers depend on the pages attended), and three at once, padded to 4, all decode sparsely
    (compared for completion only: batch 3 against batch 1 changes the GEMMs' shapes, and bfloat16 results
    with them)."""
    from concurrent.futures import ThreadPoolExecutor

    model = gpu_llama(tmp_path / "model")
    common = ["--attention-backend", "triton", "--max-running-requests", "4", "--dtype", "bfloat16",
              "--skip-tokenizer-init"]
    eager = ServerProcess(model, icecache_args(TINY_ICE, *common), log_path=tmp_path / "eager.log")
    graphs = ServerProcess(model, icecache_args(TINY_ICE, *common, "--cuda-graph-backend-decode", "breakable",
                                                "--cuda-graph-bs-decode", "1", "4"), log_path=tmp_path / "graphs.log")
    jobs = [[t % 2000 + 3 for t in token_ids(n, 130 + i)] for i, n in enumerate((600, 900, 1400))]
    with eager, graphs:
        for srv in (eager, graphs):
            got = []
            for ids in jobs:
                srv.post("/flush_cache", {})
                got.append(srv.generate(input_ids=ids, max_new_tokens=16)["output_ids"])
            if srv is eager:
                want = got
        assert got == want
        before = graphs.icecache_stats(wait_s=0)
        graphs.post("/flush_cache", {})
        with ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(lambda ids: graphs.generate(input_ids=ids, max_new_tokens=16), jobs))
        assert [r["meta_info"]["completion_tokens"] for r in together] == [16] * 3
        st = graphs.icecache_stats()
        assert st["sparse_rows"] - before["sparse_rows"] >= 3 * 15 and st["fallbacks"] == 0
    assert "Capturing batches" in graphs.log_path.read_text()  # SGLang's decode graphs were captured
