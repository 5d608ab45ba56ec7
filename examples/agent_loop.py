"""An agent-style loop: one growing conversation (tool results appended every step) against an
``--enable-icecache`` server. Each step's prompt extends the last one, so the radix cache serves the prefix
and IceCache shares its index; the figures printed show the indexed tokens growing by the new tokens only.

    python -m icecache_sglang.launch --model-path M --enable-icecache --port 30000   # in another shell
    python examples/agent_loop.py --url http://127.0.0.1:30000 --steps 6
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import openai

from icecache_sglang.models.fetch import essays_text


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/icecache/stats") as r:
        return json.loads(r.read())["ranks"].get("0", {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="none")
    corpus = essays_text()
    messages = [{"role": "system", "content": "You are a research agent. Read each tool result and say what to "
                                              "look up next, in one line."}]
    for step in range(args.steps):
        tool_result = corpus[step * 3000:(step + 1) * 3000]
        messages.append({"role": "user", "content": f"[tool result {step}]\n{tool_result}"})
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=32, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        st = stats(args.url)
        print(f"step {step}: prompt {r.usage.prompt_tokens:6d} tokens, cached "
              f"{(r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0) or 0:6d}; "
              f"IceCache indexed {st.get('indexed_tokens')}, shared {st.get('shared_tokens')} | "
              f"{r.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
