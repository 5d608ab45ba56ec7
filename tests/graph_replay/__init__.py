"""SGLang's breakable decode-graph replay, emulated on the CPU (tests/test_server_graphs.py).

Loaded into a test server's processes as ``SGLANG_EXTERNAL_MODEL_PACKAGE`` (it adds no model). On a GPU,
``--cuda-graph-backend-decode breakable`` makes SGLang capture a decode step's layers around their attention
and, before each replay, call the attention backend's ``init_forward_metadata_out_graph`` with a view of the
batch padded to a captured size; the attention then runs eagerly between the captured segments, on the
padded static batch. CUDA graphs do not exist on the CPU, so this replaces the eager decode runner with the
same sequence of calls, unrecorded: a capture of a dummy batch of each size before its first replay, then every step
padded by ``ICECACHE_TEST_GRAPH_PAD`` rows (req_to_token row 0, sequence length 1, KV slot 0, as SGLang's
graph buffers pad), its metadata from SGLang's own ``build_replay_fb_view`` (the dense backend's
``forward_metadata`` first set to an eager pass's, which the replay's preparation must replace), its model forward under
SGLang's breakable-graph flag, its logits cut back to the real rows. What it cannot show: the capture itself
(which ops a CUDA graph records); ``benchmarks/gpu/serve_gpu.py --modes icecache-graphs`` checks that on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_context import forward_context, get_forward_context
from sglang.srt.model_executor.runner import eager_runner
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import enable_breakable_cuda_graph

PAD = int(os.environ.get("ICECACHE_TEST_GRAPH_PAD", "3"))
SEQ_LEN_FILL = 1  # FlashInfer's and Triton's get_cuda_graph_seq_len_fill_value
_eager_decode = eager_runner.EagerRunner._execute_decode
_captured: set[int] = set()  # the batch sizes captured
#: replays run (the test reads the server log for this line's count)
_replays = 0


def _pad(t: torch.Tensor | None, value) -> torch.Tensor | None:
    if t is None:
        return None
    return torch.cat([t, t.new_full((PAD, *t.shape[1:]), value)])


def _static_batch(fb, rows: int):
    """The graph runner's static batch for ``fb`` (its first ``rows`` real) padded by PAD rows."""
    if rows == 0:  # a capture's dummy batch
        n = fb.batch_size + PAD
        z = fb.req_pool_indices.new_zeros(n)
        return dataclasses.replace(
            fb, batch_size=n, input_ids=fb.input_ids.new_zeros(n), positions=fb.positions.new_zeros(n),
            req_pool_indices=z, seq_lens=fb.seq_lens.new_full((n,), SEQ_LEN_FILL),
            seq_lens_cpu=fb.seq_lens_cpu.new_full((n,), SEQ_LEN_FILL), seq_lens_sum=n * SEQ_LEN_FILL,
            out_cache_loc=fb.out_cache_loc.new_zeros(n))
    return dataclasses.replace(
        fb, batch_size=rows + PAD, input_ids=_pad(fb.input_ids, 0), positions=_pad(fb.positions, 0),
        req_pool_indices=_pad(fb.req_pool_indices, 0), seq_lens=_pad(fb.seq_lens, SEQ_LEN_FILL),
        seq_lens_cpu=_pad(fb.seq_lens_cpu, SEQ_LEN_FILL), out_cache_loc=_pad(fb.out_cache_loc, 0),
        seq_lens_sum=fb.seq_lens_sum + PAD * SEQ_LEN_FILL)


class _StaleMetadata:
    """What an eager pass between two replays leaves in the dense backend's ``forward_metadata`` (a prefill's
    extend metadata): a replay must not attend with it."""


def _run(runner, static, view, in_capture: bool):
    backend = runner.model_runner.attn_backend
    check = not in_capture and backend.staging is None  # with offload decode never reads the dense backend
    if check:
        backend.dense.forward_metadata = stale = _StaleMetadata()
    backend.init_forward_metadata_out_graph(view if view is not None else static, in_capture=in_capture)
    if check and backend.dense.forward_metadata is stale:
        raise RuntimeError("graph_replay: the dense backend would attend with an eager pass's metadata")
    with enable_breakable_cuda_graph(), forward_context(get_forward_context(), forward_batch=static):
        backend.init_forward_metadata_in_graph(static)
        return runner.model_runner.model.forward(static.input_ids, static.positions, static)


def _execute_decode(self, forward_batch, pp_proxy_tensors=None):
    global _replays
    backend = self.model_runner.attn_backend
    if type(backend).__name__ != "IceCacheAttnBackend" or pp_proxy_tensors is not None:
        return _eager_decode(self, forward_batch, pp_proxy_tensors)
    raw = forward_batch.batch_size
    if raw + PAD not in _captured:  # SGLang captures every size before serving: a dummy batch, twice warmed
        _captured.add(raw + PAD)    # up, then recorded (here: each size the first time it is replayed)
        for _ in range(3):
            _run(self, _static_batch(forward_batch, 0), None, in_capture=True)
    static = _static_batch(forward_batch, raw)
    bufs = SimpleNamespace(input_ids=static.input_ids, positions=static.positions,
                           req_pool_indices=static.req_pool_indices, seq_lens=static.seq_lens,
                           seq_lens_cpu=static.seq_lens_cpu, encoder_lens=None, mamba_track_indices=None)
    view = build_replay_fb_view(forward_batch=forward_batch, buffers=bufs, bs=raw + PAD, raw_bs=raw,
                                num_tokens=raw + PAD, global_num_tokens_cpu=None, seq_len_fill_value=SEQ_LEN_FILL,
                                capture_forward_mode=forward_batch.forward_mode, is_encoder_decoder=False)
    out = _run(self, static, view, in_capture=False)
    _replays += 1
    if _replays in (1, 10, 100) or _replays % 1000 == 0:
        print(f"graph_replay: {_replays} emulated breakable-graph replays", flush=True)
    return dataclasses.replace(
        out, next_token_logits=out.next_token_logits[:raw],
        hidden_states=None if out.hidden_states is None else out.hidden_states[:raw])


eager_runner.EagerRunner._execute_decode = _execute_decode
