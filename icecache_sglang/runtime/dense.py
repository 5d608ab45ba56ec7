"""The dense attention under IceCache: prefill, the first ``dense_layers`` layers and every decode request
within the budget run on one of SGLang's own backends, which ``IceCacheAttnBackend`` holds and delegates to.

| ``dense_attention`` | backend |
|---|---|
| ``torch_native`` | ``TorchNativeDenseBackend``: SGLang's ``TorchNativeAttnBackend`` whose causal extend computes only the new tokens' rows (``attention/extend.py``), so a prefix hit does not re-run its prefix. The CPU path |
| ``triton`` | SGLang's ``TritonAttnBackend`` (CUDA) |
| ``flashinfer`` | SGLang's ``FlashInferAttnBackend`` (CUDA, flashinfer-python installed) |
| ``auto`` | flashinfer on CUDA where it is installed, else triton; torch_native on the CPU |

IceCache's sparse decode (its own layers, its own plans) never goes through the dense backend: see
``backend.py``.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from .attention import flashinfer_importable
from .attention.extend import extend_attention


class TorchNativeDenseBackend(TorchNativeAttnBackend):
    """SGLang's torch-native backend with an extend that computes only the new tokens' rows."""

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        """Causal self-attention computes only the new tokens' rows (``attention/extend.py``): a prefix hit
        costs its new tokens, not a second prefill of the prefix. Anything else: SGLang's own."""
        if not causal or is_cross_attn or encoder_lens is not None or sliding_window_size is not None:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                extend_seq_lens, encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        return extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                extend_prefix_lens, extend_seq_lens, scaling, enable_gqa)


def resolve_dense_attention(name: str, device) -> str:
    """The backend a ``dense_attention`` setting means for a KV pool on ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return ("flashinfer" if flashinfer_importable() else "triton") if on_cuda else "torch_native"
    if name != "torch_native" and not on_cuda:
        raise ValueError(f"dense_attention {name!r} needs the KV cache on a CUDA device; use torch_native")
    return name


def dense_backend_for(name: str, model_runner):
    """SGLang's backend for a resolved ``dense_attention`` name, built as SGLang's registry builds it."""
    if name == "torch_native":
        return TorchNativeDenseBackend(model_runner)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS[name](model_runner)
