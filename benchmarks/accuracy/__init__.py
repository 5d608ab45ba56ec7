"""Accuracy of IceCache against dense decoding, oracles and peer baselines, end to end through a real SGLang
server (issue #5). A library (tests import it) and a command:

    python benchmarks/accuracy/run.py --preset smoke|quick|full [--out DIR] [--model M] [--resume]

- ``tasks``: samples generated offline with the model's own tokenizer at a chosen context length, seeded;
- ``modes``: dense, IceCache at several budgets, and the baselines the same backend serves;
- ``runner``: one server per (model, sink/window) group; every mode through ``POST /icecache/config``, so a
  prompt is prefilled once and the radix cache serves it to every mode; resumable JSONL, summary, plot.
"""
