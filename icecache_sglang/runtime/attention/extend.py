"""Extend (prefill) attention over a cached prefix that computes only the new tokens' rows.

SGLang's torch_native extend pads each request's queries to the whole sequence (prefix + new tokens) and
runs causal attention over all of it, so a prefix hit of ``P`` cached tokens plus ``n`` new ones costs
``(P + n)^2`` instead of ``n * (P + n)``: a one-token extend after a 1k-token prefix costs as much as the
prefix's own prefill. Multi-turn chats and agents hit the radix cache on every turn, so the backend uses
this instead (same math: query ``i`` sees keys ``[0, P + i]``).
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention


def extend_attention(q: torch.Tensor, o: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor, scale: float | None,
                     enable_gqa: bool) -> torch.Tensor:
    """Causal attention of each request's new tokens over its prefix and themselves.

    ``q``/``o``: ``[new tokens, heads, head_dim]`` (requests back to back); ``k_cache``/``v_cache``: the
    layer's pool ``[slots, kv_heads, head_dim]``; ``req_to_token[row, pos]``: the slot of each position.
    Writes ``o`` and returns it.
    """
    rows = req_pool_indices.tolist()
    lens, prefixes, news = seq_lens.tolist(), prefix_lens.tolist(), extend_lens.tolist()
    start = 0
    for row, total, prefix, n in zip(rows, lens, prefixes, news):
        if n == 0:
            continue
        slots = req_to_token[row, :total]
        k = k_cache[slots].movedim(0, 1).unsqueeze(0)  # [1, kv_heads, total, d]
        v = v_cache[slots].movedim(0, 1).unsqueeze(0)
        qi = q[start:start + n].movedim(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if k.dtype != qi.dtype:
            k, v = k.to(qi.dtype), v.to(qi.dtype)
        out = None
        if prefix and n > 1:
            out = _prefix_then_causal(qi, k, v, prefix, scale)
        if out is None:
            mask, causal = None, False
            if prefix == 0:
                causal = True  # square: torch's causal mask is the right one
            elif n > 1:  # query i (position prefix + i) sees keys [0, prefix + i]
                pos = torch.arange(total, device=q.device)
                mask = pos[None, :] <= (prefix + torch.arange(n, device=q.device))[:, None]
            out = scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=enable_gqa)
        o[start:start + n] = out.squeeze(0).movedim(0, 1)
        start += n
    return o


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_then_causal(q, k, v, prefix: int, scale: float | None) -> torch.Tensor | None:
    """Attention of ``n`` new queries over ``prefix`` cached keys (all visible) and the new keys (causal),
    as two flash passes merged by their log-sum-exps: an explicit ``[n, prefix + n]`` mask sends torch's
    CPU attention to its unfused path (1.53 vs 0.76 s per layer for an 8192-token chunk after an
    8192-token prefix, 4 query / 2 KV heads; a long prompt's second and later chunks). ``q [1, H, n, d]``,
    ``k``/``v`` ``[1, H_kv, prefix + n, d]``. None where the fused CPU kernel is unavailable (then the
    masked call)."""
    if _FLASH_CPU is None or q.device.type != "cpu":
        return None
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    try:
        oa, la = _FLASH_CPU(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)[:2]
        ob, lb = _FLASH_CPU(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)[:2]
    except (RuntimeError, TypeError):  # a torch whose private kernel differs: the public, masked call
        return None
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    return ((oa * wa[..., None] + ob * wb[..., None]) / (wa + wb)[..., None]).to(q.dtype)
