"""Talk to a running ``--enable-icecache`` server with the OpenAI client (streaming).

    python -m icecache_sglang.launch --model-path M --enable-icecache --port 30000   # in another shell
    python examples/openai_client.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import openai

from icecache_sglang.models.fetch import essays_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--chars", type=int, default=8000)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="none")
    prompt = essays_text()[: args.chars] + "\n\nList the three main ideas of the text above."
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=128, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
