"""Evaluation samples, generated offline with each model's own tokenizer at a chosen context length.

A sample is token ids (the exact context length, whatever the tokenizer does with the text), the expected
answer strings, and how to score a completion. Same (task, context, seed) -> same samples.

``passkey`` (the Landmark/Quest/IceCache protocol: filler text, a 5-digit key at depths 0.1..0.9, the raw
prompt) and RULER's 13 tasks (``ruler.py``: NVIDIA's generators; an instruct model gets them through its
chat template). Scores are RULER's string matches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from icecache_sglang.models.texts import PASSKEY_FILLER, passkey_prompt

from . import ruler

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
    metric: str = "all"  # RULER's string_match_all ("all") or string_match_part ("part")

    @property
    def sample_id(self) -> str:
        return f"{self.task}/{self.context}/{self.index}"

    def score(self, completion: str) -> float:
        """RULER's per-sample score in [0, 1], ignoring case: the fraction of the expected strings found in
        the completion (``all``), or 1.0 if any of them is (``part``, for QA's alternative answers)."""
        text = completion.strip().lower()
        found = [a.lower() in text for a in self.answers]
        return float(any(found)) if self.metric == "part" else sum(found) / len(found)


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


def ruler_task(task: str):
    """Samples of one RULER task, at most ``context`` prompt tokens (RULER's own length rule, with the chat
    template's tokens taken off its budget)."""

    def make(tokenizer, context: int, n: int, seed: int = 0) -> list[Sample]:
        cfg, metric = ruler.task_config(task), ruler.metric(task)
        chat = getattr(tokenizer, "chat_template", None) is not None
        wrap = ((lambda user: tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                            add_generation_prompt=True)) if chat else (lambda u: u))
        overhead = len(tokenizer(wrap("x") + "x", add_special_tokens=False)["input_ids"]) - 2
        rows = ruler.generate(task, tokenizer.name_or_path, context + cfg["tokens_to_generate"] - overhead, n, seed)
        out = []
        for r in rows:
            # the last separator starts the answer; earlier ones belong to worked examples (cwe, fwe, vt
            # few-shot), where RULER's own text has the answer prefix right after the task
            user, prefix = r["input"].rsplit(ruler.SPLIT, 1)
            user = user.replace(ruler.SPLIT, "")
            text = wrap(user) + (prefix.lstrip() if chat else prefix)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answers = tuple(r["outputs"])
            if not answers:  # cwe below ~1k tokens: too few words for its 10 common ones
                raise ruler.RulerError(f"RULER's generator made a {task} sample without expected answers at "
                                       f"{context} tokens; use a longer context for {task}")
            ans = [len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers]
            need = max(ans) if metric == "part" else sum(ans) + len(ans)
            out.append(Sample(task, context, r["index"], ids, answers,
                              max_new_tokens=min(cfg["tokens_to_generate"], need + ruler.ANSWER_MARGIN),
                              meta={"prompt_len": len(ids)}, metric=metric))
        return out

    return make


TASKS = {"passkey": passkey, **{t: ruler_task(t) for t in ruler.TASKS}}


def make_samples(task: str, tokenizer, context: int, n: int, seed: int = 0) -> list[Sample]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built: {sorted(TASKS)}")
    return TASKS[task](tokenizer, context, n, seed)
