"""The accuracy harness (benchmarks/accuracy): samples (passkey, and RULER's from NVIDIA's generators),
scoring, intervals, and the smoke preset end to end through a real server (SmolLM2 on CPU), resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy.modes import Mode, modes  # noqa: E402
from accuracy.runner import PRESETS, load_results, run, summarize, targets, wilson  # noqa: E402
from accuracy import ruler  # noqa: E402
from accuracy.tasks import PASSKEY_DEPTHS, Sample, make_samples  # noqa: E402

from icecache_sglang.runtime.config import MAX_DEADLINE_MS  # noqa: E402


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


def test_ruler_samples_come_from_nvidias_generators_seeded_and_within_the_context(tokenizer):
    a = make_samples("niah_single_1", tokenizer, 512, 2)
    assert [s.input_ids for s in a] == [s.input_ids for s in make_samples("niah_single_1", tokenizer, 512, 2)]
    other = make_samples("niah_single_1", tokenizer, 512, 2, seed=1)
    assert [s.answers for s in other] != [s.answers for s in a]
    for s in a:
        text = tokenizer.decode(s.input_ids)
        assert 256 < len(s.input_ids) <= 512 and s.meta["prompt_len"] == len(s.input_ids)
        (key,) = s.answers
        assert key.isdigit() and f"is: {key}." in text  # RULER's needle: "One of the special magic numbers ..."
        # an instruct model gets the task as the user's turn and RULER's answer prefix as the start of its own
        assert text.rstrip().endswith("<|im_start|>assistant\nThe special magic number for " +
                                      text.split("special magic number for ")[-1].split(" mentioned")[0] +
                                      " mentioned in the provided text is")
        assert s.metric == "all" and s.max_new_tokens <= ruler.task_config("niah_single_1")["tokens_to_generate"]
    assert ruler.metric("qa_1") == "part" and ruler.metric("vt") == "all"
    # a worked example (cwe's) stays in the user's turn with its own answer; only the last prefix starts ours
    (cwe,) = make_samples("cwe", tokenizer, 1024, 1)
    text = tokenizer.decode(cwe.input_ids)
    assert text.count("<|im_start|>assistant") == 1 and ruler.SPLIT not in text
    assert text.count("The top 10 words that appear most often in the list are:") == 2
    assert text.endswith("<|im_start|>assistant\nAnswer: The top 10 words that appear most often in the list are:")
    assert len(cwe.answers) == 10
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.task_config("niah_single_9")


def test_a_ruler_generator_that_cannot_fit_its_haystack_fails_clearly(tokenizer, monkeypatch):
    # RULER's QA generator retries forever when even its smallest set of documents is too long
    with monkeypatch.context() as m, pytest.raises(ruler.RulerError, match="did not finish qa_1 at 200 tokens"):
        m.setattr(ruler, "GENERATOR_TIMEOUT_S", 8)
        ruler.generate("qa_1", tokenizer.name_or_path, 200, 1, seed=12345)
    # and cwe below ~1k tokens makes samples with no common words to find: refused, not scored as 0/0
    with pytest.raises(ruler.RulerError, match="without expected answers at 768 tokens"):
        make_samples("cwe", tokenizer, 768, 1)


def test_scoring_intervals_and_summary():
    s = Sample("passkey", 512, 0, [1, 2], ("48213",), 8)
    assert s.score(" 48213. Remember") == 1.0 and s.score(" 4821") == 0.0
    # RULER's scores: string_match_all is the fraction found (ignoring case); string_match_part any one
    vt = Sample("vt", 512, 0, [1], ("XTEHF", "IRWNG", "XBQVB", "IDZEL"), 30)
    assert vt.score(" xtehf, IRWNG, XBQVB") == 0.75
    qa = Sample("qa_1", 512, 0, [1], ("France", "the French Republic"), 16, metric="part")
    assert qa.score(" france") == 1.0 and qa.score(" Spain") == 0.0
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.75
    lo, hi = wilson(0, 4)
    assert lo == 0.0 and 0.4 < hi < 0.55
    rows = [{"model": "m", "context": 512, "task": "passkey", "mode": "icecache", "budget": 128, "score": x}
            for x in (1.0, 0.0, 1.0, 1.0)]
    (r,) = summarize(rows)
    assert (r["n"], r["accuracy"]) == (4, 0.75) and r["ci95_low"] < 0.75 < r["ci95_high"]
    # targets compare modes over the cells both ran: task means, unweighted
    cell = lambda task, mode, budget, score: {"model": "m", "context": 512, "task": task, "mode": mode,  # noqa: E731
                                              "budget": budget, "score": score}
    rows = [cell("a", "dense", None, 1.0), cell("b", "dense", None, 0.5), cell("a", "icecache", 256, 1.0),
            cell("b", "icecache", 256, 0.25), cell("a", "quest", 256, 0.0)]
    t = targets(summarize(rows))
    assert t["icecache@256_vs_dense"]["fraction_of_dense"] == pytest.approx(0.625 / 0.75)
    assert t["icecache_vs_quest@256"] == {"cells": 1, "icecache": 1.0, "quest": 0.0}


def test_modes_share_servers_by_launch_settings():
    ms = modes((64, 128, 256), baseline_budgets=(128,), reuse=3)
    assert ms[0] == Mode("dense", None)
    groups = {m.launch_group() for m in ms}
    assert groups == {(16, 16, 1), (32, 32, 1), (32, 32, 3)}  # budget 64 needs a smaller sink/window
    # the longest deadline: a selection late on a loaded CPU would fall back and measure the load, not the mode
    assert Mode("quest", 128).settings() == {"budget_tokens": 128, "selection": "quest",
                                             "selection_deadline_ms": MAX_DEADLINE_MS, "while_indexing": "wait",
                                             "step_reuse": 1, "max_stale_steps": 0, "token_rerank": 1}
    # reused selections: IceCache's search with the reuse keys set, on the same server
    stale = modes((256,), baselines=(), stale=(2,), every=(4,), dense=False)
    assert [m.label for m in stale] == ["icecache@256", "icecache_async2@256", "icecache_every4@256"]
    assert {m.launch_group() for m in stale} == {(32, 32, 1)}
    assert stale[1].settings()["max_stale_steps"] == 2 and stale[2].settings()["step_reuse"] == 4
    assert stale[1].selection == stale[2].selection == "icecache"
    # dense: the largest budget a server with the dense mode's sink/window accepts, above every preset context
    from icecache_sglang.runtime.config import IceCacheConfig

    dense = Mode("dense", None).settings()["budget_tokens"]
    sink, window, _ = Mode("dense", None).launch_group()
    assert dense == IceCacheConfig(budget_tokens=dense, sink_tokens=sink, window_tokens=window).max_budget_tokens
    assert dense > max(c for p in PRESETS.values() for part in p.parts for c in part.contexts)
    assert Mode("dense", None) not in modes((64,), dense=False)


@pytest.mark.slow
def test_smoke_preset_end_to_end_and_resumable(tmp_path):
    preset = PRESETS["smoke"]
    summary = run(preset, tmp_path, progress=lambda *_: None)
    records = json.loads(summary.read_text())
    assert {r["mode"] for r in records} == {"dense", "icecache", "streaming"}
    assert {r["task"] for r in records} == {"passkey", "niah_single_1", "mean"}
    for r in records:
        assert {"model", "context", "task", "mode", "budget", "n", "accuracy"} <= set(r)
        assert r["n"] == (4 if r["task"] == "mean" else 2) and 0.0 <= r["accuracy"] <= 1.0
    for mode in ("dense", "icecache", "streaming"):  # the mean over tasks is the mean of the tasks' accuracies
        mean, *per_task = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["task"] != "mean")
        assert mean["accuracy"] == pytest.approx(sum(r["accuracy"] for r in per_task) / 2)
    t = json.loads((tmp_path / "accuracy_smoke_targets.json").read_text())
    assert t["icecache_vs_streaming@128"]["cells"] == 2
    lines = load_results(tmp_path / "accuracy_smoke.jsonl")
    rows = [r for r in lines if "score" in r]
    assert len(rows) == 12
    assert all(r["prompt_tokens"] == 512 for r in rows if r["task"] == "passkey")
    assert all(256 < r["prompt_tokens"] <= 512 for r in rows if r["task"] == "niah_single_1")
    # the backend really decoded each mode as asked: dense never queried; the others queried their policy
    per_mode = {r["mode_label"]: r for r in lines if r.get("kind") == "mode"}
    assert per_mode["dense"]["queries"] == 0 and per_mode["dense"]["sparse_rows"] == 0
    for label, selection in (("icecache@128", "icecache"), ("streaming@128", "streaming")):
        assert per_mode[label]["selection"] == selection and per_mode[label]["budget_tokens"] == 128
        assert per_mode[label]["queries"] > 0 and per_mode[label]["fallbacks"] == 0
    assert (tmp_path / "accuracy_smoke.png").exists()
    run(preset, tmp_path, progress=lambda *_: None)  # resumes: everything is done, no server is started
    assert len(load_results(tmp_path / "accuracy_smoke.jsonl")) == len(lines)
