"""A Llama whose attention layers write K/V into SGLang's KV pool themselves and then call attention with
``save_kv_cache=False``: the model path SGLang takes on CUDA when RoPE and the KV write are fused
(``models/utils.py`` ``enable_fused_set_kv_buffer``: Qwen3-MoE, gpt-oss, ...), reproduced on the CPU so
the test suite can check that IceCache indexes the keys such models store."""

from __future__ import annotations

import types

from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_context import get_token_to_kv_pool
from sglang.srt.models.llama import LlamaForCausalLM


def _fused_forward(self, positions, hidden_states, forward_batch):
    q, k, v = self.forward_prepare_native(positions=positions, hidden_states=hidden_states)
    attn = self.attn
    get_token_to_kv_pool().set_kv_buffer(
        attn, KVWriteLoc(forward_batch.out_cache_loc, None), k.view(-1, attn.tp_k_head_num, attn.qk_head_dim),
        v.view(-1, attn.tp_v_head_num, attn.v_head_dim))
    out = attn(q, k, v, forward_batch, save_kv_cache=False)
    output, _ = self.o_proj(out)
    return output


class FusedKVWriteLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.model.layers:
            layer.self_attn.forward = types.MethodType(_fused_forward, layer.self_attn)


EntryClass = [FusedKVWriteLlamaForCausalLM]
