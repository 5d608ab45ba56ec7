"""A multi-turn SGLang frontend-language program against an ``--enable-icecache`` server: every turn after
the first is a radix-cache hit, so IceCache indexes only the new tokens of each turn.

    python -m icecache_sglang.launch --model-path M --enable-icecache --port 30000   # in another shell
    python examples/frontend_multi_turn.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import sglang as sgl

from icecache_sglang.models.fetch import essays_text


@sgl.function
def reading_group(s, document, questions):
    s += sgl.system("You answer questions about a document, briefly.")
    s += sgl.user(document + "\n\n" + questions[0])
    s += sgl.assistant(sgl.gen("answer_0", max_tokens=64, temperature=0))
    for i, q in enumerate(questions[1:], start=1):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=64, temperature=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    questions = ["What is the document about?", "Which example does it give?", "Summarise it in five words."]
    state = reading_group.run(document=essays_text()[:8000], questions=questions,
                              backend=sgl.RuntimeEndpoint(args.url))
    for i, q in enumerate(questions):
        print(f"Q: {q}\nA: {state[f'answer_{i}']}\n")
    with urllib.request.urlopen(args.url + "/icecache/stats") as r:
        st = json.loads(r.read())["ranks"]["0"]
    print(f"indexed {st['indexed_tokens']} tokens, reused {st['shared_tokens']} from cached prefixes")


if __name__ == "__main__":
    main()
