"""The accuracy harness (benchmarks/accuracy): samples, scoring, intervals, and the smoke preset end to end
through a real server (SmolLM2 on CPU), resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy.modes import Mode, modes  # noqa: E402
from accuracy.runner import PRESETS, load_results, run, summarize, wilson  # noqa: E402
from accuracy.tasks import PASSKEY_DEPTHS, Sample, make_samples  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from icecache_sglang.models.fetch import ensure_model

    return AutoTokenizer.from_pretrained(str(ensure_model("smollm2-135m-instruct")))


def test_passkey_samples_are_seeded_sized_and_spread_over_depths(tokenizer):
    a = make_samples("passkey", tokenizer, 1024, 5)
    b = make_samples("passkey", tokenizer, 1024, 5)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.meta["depth"] for s in a] == list(PASSKEY_DEPTHS)
    for s in a:
        assert len(s.input_ids) == 1024
        assert tokenizer.decode(s.input_ids).count(s.answers[0]) == 2  # the needle states it twice
    assert make_samples("passkey", tokenizer, 1024, 5, seed=1)[0].answers != a[0].answers
    with pytest.raises(ValueError, match="unknown task"):
        make_samples("niah_single_9", tokenizer, 1024, 1)


def test_scoring_intervals_and_summary():
    s = Sample("passkey", 512, 0, [1, 2], ("48213",), 8)
    assert s.score(" 48213. Remember") == 1.0 and s.score(" 4821") == 0.0
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.75
    lo, hi = wilson(0, 4)
    assert lo == 0.0 and 0.4 < hi < 0.55
    rows = [{"model": "m", "context": 512, "task": "passkey", "mode": "icecache", "budget": 128, "score": x}
            for x in (1.0, 0.0, 1.0, 1.0)]
    (r,) = summarize(rows)
    assert (r["n"], r["accuracy"]) == (4, 0.75) and r["ci95_low"] < 0.75 < r["ci95_high"]


def test_modes_share_servers_by_launch_settings():
    ms = modes((64, 128, 256), baseline_budgets=(128,), reuse=3)
    assert ms[0] == Mode("dense", None)
    groups = {m.launch_group() for m in ms}
    assert groups == {(16, 16, 1), (32, 32, 1), (32, 32, 3)}  # budget 64 needs a smaller sink/window
    assert Mode("quest", 128).settings() == {"budget_tokens": 128, "selection": "quest"}
    assert Mode("dense", None).settings()["budget_tokens"] > 10**6


@pytest.mark.slow
def test_smoke_preset_end_to_end_and_resumable(tmp_path):
    preset = PRESETS["smoke"]
    summary = run(preset, tmp_path, progress=lambda *_: None)
    records = json.loads(summary.read_text())
    assert {r["mode"] for r in records} == {"dense", "icecache", "streaming"}
    for r in records:
        assert {"model", "context", "task", "mode", "budget", "n", "accuracy"} <= set(r)
        assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    lines = load_results(tmp_path / "accuracy_smoke.jsonl")
    rows = [r for r in lines if "score" in r]
    assert len(rows) == 6 and all(r["prompt_tokens"] == 512 for r in rows)
    # the backend really decoded each mode as asked: dense never queried; the others queried their policy
    per_mode = {r["mode_label"]: r for r in lines if r.get("kind") == "mode"}
    assert per_mode["dense"]["queries"] == 0 and per_mode["dense"]["sparse_rows"] == 0
    for label, selection in (("icecache@128", "icecache"), ("streaming@128", "streaming")):
        assert per_mode[label]["selection"] == selection and per_mode[label]["budget_tokens"] == 128
        assert per_mode[label]["queries"] > 0 and per_mode[label]["fallbacks"] == 0
    assert (tmp_path / "accuracy_smoke.png").exists()
    run(preset, tmp_path, progress=lambda *_: None)  # resumes: everything is done, no server is started
    assert len(load_results(tmp_path / "accuracy_smoke.jsonl")) == len(lines)
