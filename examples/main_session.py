"""The main job: an SGLang server with IceCache on the embedded default model, and a short client session.

Starts ``python -m sglang.launch_server --model-path <SmolLM2-135M-Instruct> --enable-icecache`` (CPU when
there is no GPU), holds a two-turn conversation over a long document through the OpenAI API (turn 2 is
served from the radix cache and its index), and prints the answers and the IceCache figures.

    python examples/main_session.py [--model NAME_OR_FOLDER] [--chars 6000] [--budget 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from icecache_sglang.launch import ServerProcess
from icecache_sglang.models.fetch import DEFAULT_MODEL, ensure_model, essays_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--chars", type=int, default=6000, help="length of the document (characters)")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "icecache-server.log"))
    args = ap.parse_args()

    import openai

    model = ensure_model(args.model)
    cfg = {"budget_tokens": args.budget}
    print(f"starting SGLang with --enable-icecache --icecache-config '{json.dumps(cfg)}' on {model.name} "
          f"(log: {args.log}) ...", flush=True)
    t0 = time.time()
    with ServerProcess(model, ["--enable-icecache", "--icecache-config", json.dumps(cfg)], log_path=args.log) as srv:
        print(f"server ready in {time.time() - t0:.0f} s at {srv.url}\n", flush=True)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        doc = essays_text()[: args.chars]
        messages = [{"role": "user", "content": doc + "\n\nWhat is the text above about? Answer in two sentences."}]
        for turn, follow_up in enumerate([None, "Give it a short title."], start=1):
            if follow_up:
                messages.append({"role": "user", "content": follow_up})
            t = time.time()
            r = client.chat.completions.create(model="default", messages=messages, max_tokens=64, temperature=0)
            answer = r.choices[0].message.content
            messages.append({"role": "assistant", "content": answer})
            print(f"turn {turn}: {r.usage.prompt_tokens} prompt tokens, {r.usage.completion_tokens} generated, "
                  f"{time.time() - t:.1f} s")
            print(f"  user: {(follow_up or '<document> What is the text above about?')}")
            print(f"  assistant: {answer}\n", flush=True)
        st = srv.icecache_stats()
        print("IceCache figures (GET /icecache/stats):")
        keys = ["indexer_state", "decode_steps", "sparse_rows", "dense_rows", "queries", "fallbacks",
                "indexed_tokens", "shared_tokens", "pages_per_step_last", "attended_kv_bytes_max", "kv_pool_bytes",
                "key_store_bytes", "index_bytes", "icecache_host_bytes"]
        for k in keys:
            print(f"  {k:22s} {st.get(k)}")
        print("  (attended: computed from the decode plans; the other bytes: allocated. The whole KV stays in\n"
              "   SGLang's pool (kv_pool_bytes); icecache_host_bytes is what IceCache adds in host memory.)")
        print(f"  {'selection ms/step':22s} {1e3 * st['selection_s_total'] / max(st['decode_steps'], 1):.2f}")
        ind = st.get("indexer") or {}
        print(f"  indexer: {ind.get('sequences')} sequences, {ind.get('tokens')} indexed token-layers, "
              f"{(ind.get('index_bytes') or 0) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
