"""RULER's synthetic tasks, generated offline by NVIDIA's own generators (``nvidia-long-context-eval``
26.3, fetched pinned by ``icecache_sglang.models.fetch.ruler_source``) with the model's own tokenizer.

The generators are command-line programs (``long_context_eval/data/synthetic/<task>.py``, driven by
``synthetic.yaml`` and ``constants.py`` exactly as their ``prepare.py`` drives them). Two things differ:

- nltk's ``punkt`` sentence splitter needs data that cannot be downloaded offline; a regex splitter (split
  after ``.``/``!``/``?`` and whitespace) stands in for it (only the essay haystacks of the NIAH tasks use it:
  it decides where needles may be inserted);
- the prompt template is RULER's ``base`` one with a separator between the task text and the answer prefix,
  so that an instruct model gets the task as the user's turn and the answer prefix as the start of its own
  (the model's chat template), which is how such models are evaluated with RULER through chat servers.

Scores are RULER's: ``string_match_all`` (the fraction of expected strings found in the completion,
ignoring case) for every task but QA, ``string_match_part`` (any of the expected strings) for QA.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from icecache_sglang.models.fetch import cache_dir, ruler_source

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
#: between the task text (the user's turn) and the answer prefix (the start of the assistant's turn)
SPLIT = "\x1e"
#: tokens generated beyond the expected answer's own (then capped by RULER's ``tokens_to_generate``):
#: greedy decoding of a right answer has it at the start, and decode steps are what a CPU run pays for
ANSWER_MARGIN = 8
GENERATOR_TIMEOUT_S = 300

_BOOTSTRAP = r'''
import os, re, runpy, sys
import nltk.tokenize

def sent_tokenize(text, language="english"):
    """Stand-in for punkt (its data cannot be downloaded offline): split after . ! ? and whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]

nltk.tokenize.sent_tokenize = sent_tokenize
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
'''


class RulerError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def task_config(task: str) -> dict:
    """``synthetic.yaml``'s entry for ``task`` merged with its generator's constants (template, answer
    prefix, ``tokens_to_generate``), as ``prepare.py`` merges them. Cached: do not modify it."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; RULER's are {', '.join(TASKS)}")
    root = ruler_source() / "long_context_eval"
    cfg = dict(yaml.safe_load((root / "synthetic.yaml").read_text())[task])
    cfg.update(runpy.run_path(str(root / "data" / "synthetic" / "constants.py"))["TASKS"][cfg["task"]])
    return cfg


def metric(task: str) -> str:
    return "part" if task_config(task)["task"] == "qa" else "all"


def generate(task: str, tokenizer_path: str | Path, max_seq_length: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` samples (``{"index", "input", "outputs", "length"}``) of ``task`` from RULER's generator, each
    ``input`` at most ``max_seq_length`` tokens minus RULER's ``tokens_to_generate`` (the generator's own
    length rule). ``input`` holds :data:`SPLIT` between the task text and the answer prefix. Cached."""
    cfg = task_config(task)
    tok_id = hashlib.sha256(str(Path(tokenizer_path).resolve()).encode()).hexdigest()[:12]
    out = cache_dir() / "ruler-data" / f"{Path(tokenizer_path).name}-{tok_id}" / f"{task}-{max_seq_length}-{n}-{seed}.jsonl"
    if not out.exists():
        root = ruler_source()
        script = root / "long_context_eval" / "data" / "synthetic" / f"{cfg['task']}.py"
        work = out.with_suffix(".partial")
        shutil.rmtree(work, ignore_errors=True)
        cmd = [sys.executable, "-c", _BOOTSTRAP, str(script), "--save_dir", str(work), "--save_name", task,
               "--subset", "validation", "--tokenizer_path", str(tokenizer_path), "--tokenizer_type", "hf",
               "--max_seq_length", str(max_seq_length), "--tokens_to_generate", str(cfg["tokens_to_generate"]),
               "--num_samples", str(n), "--random_seed", str(42 + seed),
               "--template", cfg["template"] + SPLIT + cfg.get("answer_prefix", "")]
        for k, v in cfg["args"].items():
            cmd += [f"--{k}", str(v)]
        if cfg["task"] == "qa":
            cmd += ["--pre_samples", "0"]
        env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONSAFEPATH", None)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=GENERATOR_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            shutil.rmtree(work, ignore_errors=True)
            # the generators retry forever when their smallest haystack step does not fit (QA at ~1k tokens)
            raise RulerError(f"RULER's {cfg['task']}.py did not finish {task} at {max_seq_length} tokens in "
                             f"{GENERATOR_TIMEOUT_S} s: its smallest haystack probably does not fit; use a longer "
                             f"context for it") from None
        made = work / task / "validation.jsonl"
        if proc.returncode != 0 or not made.exists():
            raise RulerError(f"RULER's {cfg['task']}.py failed for {task} at {max_seq_length} tokens "
                             f"(exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        made.rename(out)
        shutil.rmtree(work, ignore_errors=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if len(rows) != n:
        raise RulerError(f"{out} holds {len(rows)} samples, expected {n}; delete it and retry")
    return rows
