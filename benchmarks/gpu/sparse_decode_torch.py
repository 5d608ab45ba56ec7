"""The torch sparse decode path (``runtime/attention/torch_native.py``) on a CUDA GPU, against dense decode.

Llama-3.1-8B's attention (32 query heads, 8 KV heads, head_dim 128, bfloat16), one layer, one decode step.
Dense: ``scaled_dot_product_attention`` over every token of each request. Sparse: ``TorchSparseDecode``
over a ``DecodePlan`` of ``budget`` slots per (request, KV head), read from the same pool. Checks the
sparse output against a float64 reference on the selected tokens, then times both (CUDA events, median).

This is the reference path IceCache's FlashInfer decode (issue #6) must beat; it needs torch only.

    python benchmarks/gpu/sparse_decode_torch.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from icecache_sglang.runtime.attention import DecodePlan, TorchSparseDecode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cuda_ms  # noqa: E402

HQ, HKV, D = 32, 8, 128


def run(context: int, batch: int, budget: int, reps: int, g: torch.Generator) -> dict:
    dev = "cuda"
    S = batch * context
    k_cache = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    # dense: each request owns a contiguous block of the pool
    k_dense = k_cache.view(batch, context, HKV, D).permute(0, 2, 1, 3)
    v_dense = v_cache.view(batch, context, HKV, D).permute(0, 2, 1, 3)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k_dense, v_dense, scale=scale,
                                                                enable_gqa=True)

    # sparse: budget slots per (request, KV head) inside the request's block
    offs = torch.arange(batch, device=dev).view(batch, 1, 1) * context
    slots = offs + torch.randint(0, context, (batch, HKV, budget), device=dev, generator=g)
    plan = DecodePlan(slots, torch.ones_like(slots, dtype=torch.bool))
    path = TorchSparseDecode()

    def sparse():
        return path.decode(q, k_cache, v_cache, plan, scale)

    out = sparse()
    err = 0.0
    for b in range(min(batch, 2)):
        for h in range(HKV):
            sel = slots[b, h]
            qs = q[b, h * 4:(h + 1) * 4].double()
            ref = torch.softmax(qs @ k_cache[sel, h].double().T * scale, -1) @ v_cache[sel, h].double()
            err = max(err, (out[b, h * 4:(h + 1) * 4].double() - ref).abs().max().item())
    return {"context": context, "batch": batch, "budget": budget, "dense_ms": cuda_ms(dense, reps),
            "sparse_torch_ms": cuda_ms(sparse, reps), "max_abs_err_vs_fp64": err, "ok": err < 2e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "gpu"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator(device="cuda").manual_seed(0)
    plan = [(32768, b) for b in (1, 8, 32)] + [(131072, b) for b in (1, 8, 16)]
    if args.quick:
        plan = [(32768, 1), (131072, 1)]
    records = []
    for ctx, b in plan:
        r = run(ctx, b, 2048, 20, g)
        r["speedup"] = r["dense_ms"] / r["sparse_torch_ms"]
        r |= {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "shape": f"{HQ}q/{HKV}kv/d{D}", "machine": platform.node(), "command": "python " + " ".join(sys.argv)}
        print(json.dumps(r), flush=True)
        records.append(r)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_decode_torch.json").write_text(json.dumps(records, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for ctx in sorted({r["context"] for r in records}):
            rs = [r for r in records if r["context"] == ctx]
            ax.plot([r["batch"] for r in rs], [r["dense_ms"] for r in rs], "o-", label=f"dense SDPA, {ctx // 1024}k")
            ax.plot([r["batch"] for r in rs], [r["sparse_torch_ms"] for r in rs], "s--",
                    label=f"torch sparse, 2k budget, {ctx // 1024}k")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per layer")
        ax.set_yscale("log")
        ax.set_title(f"decode attention, one layer, {records[0]['device']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "sparse_decode_torch.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
