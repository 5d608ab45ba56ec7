"""Capture real post-RoPE queries, keys and values of every layer from a Hugging Face causal LM.

A custom attention function (registered with transformers' ``AttentionInterface``) records what each
layer's attention receives, then runs the stock SDPA attention, so the forward pass is unchanged.
Keys are what a KV cache stores (post-RoPE, ``num_kv_heads`` heads); queries are kept for the last
``n_queries`` positions only, which act as decode steps over the preceding context.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fetch import cache_dir, ensure_model

_ATTN = "icecache_capture"


@dataclass
class CapturedLayer:
    queries: np.ndarray  # [n_queries, H_q, d]   the last n_queries positions
    keys: np.ndarray  # [H_kv, n_ctx, d]        positions [0, n - n_queries)
    values: np.ndarray  # [H_kv, n_ctx, d]


def _register(store: dict) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capture(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query[0].detach(), key[0].detach(), value[0].detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_ATTN, capture)
    AttentionMaskInterface.register(_ATTN, sdpa_mask)


def capture_qkv(model_name_or_path: str, token_ids: list[int], n_queries: int = 16,
                use_cache: bool = True) -> list[CapturedLayer]:
    """Per layer, the captured Q/K/V of one forward pass over ``token_ids`` (cached on disk by content)."""
    if n_queries < 1 or n_queries >= len(token_ids):
        raise ValueError(f"n_queries must be in [1, {len(token_ids)}), got {n_queries}")
    folder = ensure_model(model_name_or_path)
    digest = hashlib.sha256(np.asarray(token_ids, np.int64).tobytes() + str(folder).encode()).hexdigest()[:16]
    path = cache_dir() / "captures" / f"{Path(folder).name}-{len(token_ids)}-{n_queries}-{digest}.npz"
    if use_cache and path.exists():
        z = np.load(path)
        n_layers = len([k for k in z.files if k.startswith("q")])
        return [CapturedLayer(z[f"q{i}"].astype(np.float32), z[f"k{i}"].astype(np.float32), z[f"v{i}"].astype(np.float32))
                for i in range(n_layers)]
    import torch
    from transformers import AutoModelForCausalLM

    store: dict = {}
    _register(store)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=_ATTN)
    model.eval()
    with torch.inference_mode():
        model(torch.tensor([token_ids]), use_cache=False)
    n_ctx = len(token_ids) - n_queries
    layers = []
    for i in range(len(store)):
        q, k, v = (x.float().numpy() for x in store[i])  # [H, n, d]
        layers.append(CapturedLayer(np.ascontiguousarray(q[:, n_ctx:].transpose(1, 0, 2)),
                                    np.ascontiguousarray(k[:, :n_ctx]), np.ascontiguousarray(v[:, :n_ctx])))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        np.savez(tmp, **{f"{t}{i}": getattr(layer, name).astype(np.float16)
                         for i, layer in enumerate(layers) for t, name in (("q", "queries"), ("k", "keys"), ("v", "values"))})
        tmp.rename(path)
    return layers
