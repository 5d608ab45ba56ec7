"""The decoding modes an accuracy run compares, all served by one IceCache backend.

``dense``: the largest budget the server allows (sink + window + the indexer's 4096 pages: 65k+ tokens, above
every context of the presets), so every request decodes densely (SGLang's own attention path;
token-identical to a server without IceCache, tests/test_server_outputs.py). ``icecache``: the index's
search at a budget. Baselines at the same budget, same sink/window and pages: ``oracle_page`` (IceCache's
page layout, exact scores), ``oracle_positional``, ``quest``, ``streaming`` (sink + recent window).
``icecache_reuse``: the index's search with layer reuse (anchor layers only; needs its own server).
``icecache_async{k}``: the search with asynchronous selection (``max_stale_steps: k``), and
``icecache_every{k}``: synchronous selection every k steps (``step_reuse: k``), on the same server.
``icecache_rerank{m}`` / ``icecache_async{k}_rerank{m}``: the same with ``token_rerank: m`` (m times the
budget's pages asked for, the budget's best tokens among them by the step's own query).
"""

from __future__ import annotations

from dataclasses import dataclass

from icecache_sglang.index.selection import default_sink_window
from icecache_sglang.indexer.config import MAX_PAGES
from icecache_sglang.runtime.config import MAX_DEADLINE_MS

PAGE_SIZE = 16  # the accuracy servers' page size (runner._server_args)
BASELINES = ("oracle_page", "oracle_positional", "quest", "streaming")


@dataclass(frozen=True)
class Mode:
    name: str  # dense, icecache, icecache_reuse, or a baseline
    budget: int | None  # None for dense
    layer_reuse: int = 1
    step_reuse: int = 1  # synchronous selection every step_reuse steps
    max_stale: int = 0  # asynchronous selection: a selection at most this many steps old (0: synchronous)
    token_rerank: int = 1  # candidates per selected page, re-ranked token by token (1: off)

    @property
    def selection(self) -> str:
        return "icecache" if self.name == "dense" or self.name.startswith("icecache") else self.name

    def launch_group(self) -> tuple[int, int, int]:
        """(sink, window, layer_reuse): what the server must be launched with (not changeable at runtime)."""
        sink, window = default_sink_window(self.budget) if self.budget else default_sink_window(256)
        return sink, window, self.layer_reuse

    def settings(self) -> dict:
        """``POST /icecache/config`` body. The selection deadline is the longest allowed: an accuracy run
        measures what each mode selects, and several requests in flight on a few cores make the indexer
        late (its queries wait behind other requests' builds and the model's prefill): a late selection
        falls back to the most recent pages, which measures the machine's load, not the mode. The deadline's
        own behaviour is ``benchmarks/faults.py``'s. Every decode step selects (``while_indexing: wait``):
        attending densely while an index is built would score dense's answers to the mode."""
        if self.budget is None:  # dense: the largest budget this server's sink and window allow
            sink, window, _ = self.launch_group()
            budget = sink + window + MAX_PAGES * PAGE_SIZE
        else:
            budget = self.budget
        return {"budget_tokens": budget, "selection": self.selection, "selection_deadline_ms": MAX_DEADLINE_MS,
                "while_indexing": "wait", "step_reuse": self.step_reuse, "max_stale_steps": self.max_stale,
                "token_rerank": self.token_rerank}

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget}"


def modes(budgets, baselines=BASELINES, baseline_budgets=None, reuse: int = 0, dense: bool = True,
          stale: tuple[int, ...] = (), every: tuple[int, ...] = (),
          rerank: tuple[tuple[int, int], ...] = ()) -> list[Mode]:
    """dense (unless ``dense`` is false) + IceCache at every budget + each baseline at ``baseline_budgets``
    (default: every budget) + IceCache with layer reuse ``reuse`` at 256 (when > 1) + IceCache at every
    budget with asynchronous selection at each staleness bound of ``stale`` and with synchronous selection
    every k steps for each k of ``every``, and with ``token_rerank: m`` at staleness bound k (0: synchronous)
    for each (k, m) of ``rerank``."""
    out = [Mode("dense", None)] * dense + [Mode("icecache", b) for b in budgets]
    for b in budgets:
        out += [Mode(f"icecache_async{k}", b, max_stale=k) for k in stale]
        out += [Mode(f"icecache_every{k}", b, step_reuse=k) for k in every]
        out += [Mode(f"icecache_async{k}_rerank{m}" if k else f"icecache_rerank{m}", b, max_stale=k, token_rerank=m)
                for k, m in rerank]
    for b in baseline_budgets or budgets:
        out += [Mode(name, b) for name in baselines]
    if reuse > 1:
        out.append(Mode("icecache_reuse", 256, layer_reuse=reuse))
    return out
