"""``--icecache-config``: one JSON object, validated where it is read, with messages that name the problem.

    --icecache-config '{"budget_tokens": 512, "page_size": 16, "sink_tokens": 32, "window_tokens": 64}'

Every key is optional. Unknown keys, wrong types and budgets that leave no room for selected pages are
refused with the reason, so a bad flag fails at launch, not at the first decode step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..index.config import DEFAULT_GQA_MERGE, GQA_MERGES, MAX_PAGE_SIZE, IndexConfig, QueryParams
from ..indexer.config import MAX_PAGES
from ..indexer.policies import POLICIES

#: the index parameters a user may set (the rest of IndexConfig is internal)
INDEX_KEYS = ("p0", "p_up", "seed", "rebuild_growth", "key_dtype", "layout", "parent_segment")
QUERY_KEYS = ("fov", "prop_to_retrieve")
DECODE_ATTENTION = ("auto", "torch", "flashinfer", "triton")
DENSE_ATTENTION = ("auto", "torch_native", "triton", "flashinfer")
WHILE_INDEXING = ("auto", "dense", "wait")
#: lanes of the offloaded decode's device pool when device_kv_tokens is not given
DEFAULT_DEVICE_LANES = 32
#: the first layers that keep full attention when dense_layers is not given, without offload (with offload: 0)
DEFAULT_DENSE_LAYERS = 2
#: the largest host KV pool a rank may ask for (GiB): beyond any machine's RAM, so a typo in the unit is refused
MAX_HOST_KV_GB = 65536
#: the most candidate pages per selected page token re-ranking may ask for
MAX_TOKEN_RERANK = 8
#: the most decode steps a selection may be reused for (step_reuse) or be old (max_stale_steps)
MAX_REUSE_STEPS = 1024
#: the longest a decode step may wait for its selections (a minute already stalls every request in the batch)
MAX_DEADLINE_MS = 60_000.0


#: how the launcher hands the validated configuration to SGLang's spawned scheduler processes
ENV_VAR = "SGLANG_ICECACHE_CONFIG"


class IceCacheConfigError(ValueError):
    """A bad ``--icecache-config``; the message says which key and why."""


@dataclass(frozen=True)
class IceCacheConfig:
    """budget_tokens: KV tokens each sparse request attends per KV head and layer at decode: sink + window +
    selected pages (at most ``max_budget_tokens``; a request within the budget decodes densely).
    page_size: tokens per page (C). sink_tokens / window_tokens: the first and the most recent tokens, always
    attended and never indexed. dense_layers: the first layers keep full attention (null: ``DEFAULT_DENSE_LAYERS``,
    0 with offload). layer_reuse: one
    layer in every ``layer_reuse`` searches; the layers after it reuse its pages (1: every layer searches).
    index / query: parameters of the paged DCI index and its search. selection_deadline_ms: how long a
    decode step waits for the indexer before it falls back to the most recent pages. indexer_threads:
    numba threads of each indexer process (None: all cores it may use). decode_attention: the sparse decode
    path: ``torch`` (any device), ``flashinfer`` (CUDA, flashinfer-python installed), ``triton`` (CUDA:
    IceCache's own kernels, no host plan per layer) or ``auto`` (flashinfer where it can run, else torch). dense_attention: the SGLang backend that runs prefill, the dense layers and
    requests within the budget: ``torch_native``, ``triton`` or ``flashinfer`` (CUDA), or ``auto``
    (``--attention-backend`` when one is given; else flashinfer, or triton without it, on CUDA; torch_native
    on the CPU). selection: how pages are chosen: ``exact`` (the default: IceCache's
    pages ranked by exact score with a tight scan, no slower than the search on CPU and never missing the
    best page), ``lowrank`` (the same exact ranking over the candidates a query-aware low-rank first pass
    picks, reading a fraction of the keys: ``index/lowrank.py``; sequences under 16384 tokens, and each layer's
    first queries, are scanned exactly), ``lowrank_pages`` (``lowrank`` scoring only the tokens of the pages
    whose summaries rank best: faster at long contexts, may miss a page whose best token lies far from its
    mean), ``icecache`` (the index's M-DCI search) or a baseline over the same tokens and budget, for
    evaluation: ``oracle_page`` (IceCache's pages ranked by
    exact score), ``oracle_positional`` (fixed pages of page_size tokens, exact score), ``quest`` (their
    min/max bound) or ``streaming`` (the most recent tokens: sink + recent window). gqa_merge: how the query
    heads of a KV head share its pages (``index/gqa_merge.py``): ``mass`` (the default: every query head's best
    page, then the pages with the most estimated attention for the group) or ``rank`` (rank-major: each query
    head's next best page in turn, the paper's). max_restarts /
    restart_window_s: how many times a dead or stuck indexer is replaced within that many seconds before it
    is left down (selections fall back) until the window frees a restart. offload: decode attention reads
    only a device pool of fixed size (``runtime/pool/device_pool.py``), one lane per decoding request
    holding its attended rows (sink + selected pages + recent tokens), filled from SGLang's KV pool;
    device_kv_tokens: that pool's rows per layer and KV head, at least one lane of ``lane_rows`` (null:
    ``DEFAULT_DEVICE_LANES`` lanes); SGLang runs at most ``device_kv_tokens // lane_rows`` requests. A lane holds
    ``budget_tokens + page_size`` rows, plus one per step of staleness with ``step_reuse`` / ``max_stale_steps``
    (a reused selection attends to every token indexed since). With offload no layer attends densely at decode
    (``dense_layers`` must be 0, its default with offload: the same answers on the accuracy harness's
    ``dense-layers0`` preset, README), and on a running server the budget and the staleness can change only within
    the launch's lane (``control.py``). host_kv_gb: with offload, SGLang's KV pool is host memory (pinned on
    a GPU) of this many GiB per rank, and SGLang admits requests by it (null: on a GPU, half the host's
    available memory divided among the GPU's ranks; on a machine without a GPU, SGLang's own sizing).
    prefill_staging_tokens: with offload, the rows (tokens of one layer) of the device buffer prefill attends
    over, allocated at launch; an extend batch whose requests' prefixes and new tokens would not fit waits for
    the next batch (``patches/admission.py``), one request always runs (null: SGLang's request-row width, the
    context length and a few rows, the least allowed). stall_report_s: a
    forward pass that takes this many seconds is logged with the scheduler thread's stack, and again every
    as many seconds while it lasts (``runtime/stall.py``; 0 turns it off). while_indexing: how a decode step
    runs while the indexer is behind (a request's first index is being built, or index writes of earlier
    steps are unanswered) or not serving (restarting, down): ``dense`` (the step attends to every token, as SGLang would: exact, and no wait; the first
    token of a long prompt is not held back by its index) or ``wait`` (the step waits for the writes up to
    the deadline plus an allowance per indexed token, then falls back: the paper's behaviour, and what the
    accuracy harness measures); ``auto``: ``dense``, or ``wait`` with offload (the device pool holds no
    request's full KV). step_reuse / max_stale_steps: how fresh a step's selections are
    (``runtime/selection_cache.py``): ``step_reuse: k`` selects synchronously every k steps of a request and
    reuses that selection in between; ``max_stale_steps: k`` (k >= 1) sends each anchor layer's query
    without waiting for it and attends with the freshest selection already answered, waiting only when none
    is at most k steps old (while the indexer lags behind, each layer asks every ceil(k / 2) steps only).
    Both 1 / 0 (the default): every step selects and waits, the paper's behaviour. token_rerank: m > 1 asks
    the indexer for m times the budget's pages, and each anchor layer attends to the budget's best tokens
    among their tokens, ranked by the step's own query (``runtime/rerank.py``); 1: the pages as selected.
    A reused selection attends, besides its pages, to every token indexed after it was made."""

    budget_tokens: int = 256
    page_size: int = 16
    sink_tokens: int = 32
    window_tokens: int = 32
    dense_layers: int | None = None
    layer_reuse: int = 1
    index: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    selection_deadline_ms: float = 500.0
    indexer_threads: int | None = None
    decode_attention: str = "auto"
    dense_attention: str = "auto"
    selection: str = "exact"
    gqa_merge: str = DEFAULT_GQA_MERGE
    max_restarts: int = 5
    restart_window_s: float = 600.0
    offload: bool = False
    device_kv_tokens: int | None = None
    host_kv_gb: float | None = None
    prefill_staging_tokens: int | None = None
    stall_report_s: float = 30.0
    while_indexing: str = "auto"
    step_reuse: int = 1
    max_stale_steps: int = 0
    token_rerank: int = 1

    def __post_init__(self) -> None:
        if self.dense_layers is None:  # the default depends on offload, which keeps no layer's full KV on the device
            object.__setattr__(self, "dense_layers", 0 if self.offload is True else DEFAULT_DENSE_LAYERS)
        for name in ("budget_tokens", "page_size", "sink_tokens", "window_tokens", "dense_layers", "layer_reuse"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise IceCacheConfigError(f"{name} must be an integer, got {v!r}")
        if not 2 <= self.page_size <= MAX_PAGE_SIZE:
            raise IceCacheConfigError(f"page_size must be in [2, {MAX_PAGE_SIZE}], got {self.page_size}")
        for name in ("sink_tokens", "window_tokens", "dense_layers"):
            if getattr(self, name) < 0:
                raise IceCacheConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.layer_reuse < 1:
            raise IceCacheConfigError(f"layer_reuse must be >= 1 (1 turns it off), got {self.layer_reuse}")
        room = self.budget_tokens - self.sink_tokens - self.window_tokens
        if room < self.page_size:
            raise IceCacheConfigError(
                f"budget_tokens ({self.budget_tokens}) must exceed sink_tokens + window_tokens "
                f"({self.sink_tokens} + {self.window_tokens}) by at least one page of page_size "
                f"({self.page_size}) tokens, or no page is ever selected")
        if self.n_pages > MAX_PAGES:
            raise IceCacheConfigError(
                f"budget_tokens ({self.budget_tokens}) asks for {self.n_pages} pages per KV head; the indexer "
                f"selects at most {MAX_PAGES} (budget_tokens <= {self.max_budget_tokens} with these sink, window "
                f"and page sizes). A request within the budget decodes densely anyway")
        d = self.selection_deadline_ms
        if (not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d)
                or not 0 < d <= MAX_DEADLINE_MS):
            raise IceCacheConfigError(f"selection_deadline_ms must be a number in (0, {MAX_DEADLINE_MS}], got {d!r}")
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or not 0 <= self.max_restarts <= 1000:
            raise IceCacheConfigError(f"max_restarts must be an integer in [0, 1000], got {self.max_restarts!r}")
        w = self.restart_window_s
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or not 0 < w <= 86400:
            raise IceCacheConfigError(f"restart_window_s must be a number of seconds in (0, 86400], got {w!r}")
        r = self.stall_report_s
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or not 0 <= r <= 86400:
            raise IceCacheConfigError(f"stall_report_s must be a number of seconds in [0, 86400] (0: off), got {r!r}")
        t = self.indexer_threads
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise IceCacheConfigError(f"indexer_threads must be a positive integer or null, got {t!r}")
        if not isinstance(self.offload, bool):
            raise IceCacheConfigError(f"offload must be true or false, got {self.offload!r}")
        n = self.device_kv_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise IceCacheConfigError(f"device_kv_tokens must be a positive integer or null, got {n!r}")
        if n is not None and not self.offload:
            raise IceCacheConfigError("device_kv_tokens sizes the offloaded decode's device pool; set offload: true")
        g = self.host_kv_gb
        if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g)
                              or not 0 < g <= MAX_HOST_KV_GB):
            raise IceCacheConfigError(f"host_kv_gb must be a number of GiB in (0, {MAX_HOST_KV_GB}], got {g!r}")
        if g is not None and not self.offload:
            raise IceCacheConfigError("host_kv_gb sizes SGLang's KV pool in host memory, which it is with offload "
                                      "only; set offload: true")
        st = self.prefill_staging_tokens
        if st is not None and (not isinstance(st, int) or isinstance(st, bool) or st < 1):
            raise IceCacheConfigError(f"prefill_staging_tokens must be a positive integer or null, got {st!r}")
        if st is not None and not self.offload:
            raise IceCacheConfigError("prefill_staging_tokens sizes the staging buffer prefill attends over with "
                                      "offload; set offload: true")
        if self.offload and self.dense_layers:
            raise IceCacheConfigError(
                f"offload keeps no layer's full KV on the device, so no layer can attend densely at decode: "
                f"leave dense_layers out (0 with offload) or set it to 0 (it is {self.dense_layers})")
        if self.while_indexing not in WHILE_INDEXING:
            raise IceCacheConfigError(f"while_indexing must be one of {list(WHILE_INDEXING)}, got {self.while_indexing!r}")
        if self.offload and self.while_indexing == "dense":
            raise IceCacheConfigError(
                "while_indexing 'dense' attends to every token, but with offload the device pool holds only "
                "each request's budget: use 'wait' or 'auto'")
        for name, lo in (("step_reuse", 1), ("max_stale_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_REUSE_STEPS:
                raise IceCacheConfigError(f"{name} must be an integer in [{lo}, {MAX_REUSE_STEPS}], got {v!r}")
        m = self.token_rerank
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= MAX_TOKEN_RERANK:
            raise IceCacheConfigError(f"token_rerank must be an integer in [1, {MAX_TOKEN_RERANK}], got {m!r}")
        if self.candidate_pages > MAX_PAGES:
            raise IceCacheConfigError(
                f"token_rerank {m} x the budget's {self.n_pages} pages asks the indexer for {self.candidate_pages} "
                f"pages per KV head; it selects at most {MAX_PAGES}: lower token_rerank or budget_tokens")
        if self.step_reuse > 1 and self.max_stale_steps > 0:
            raise IceCacheConfigError(
                f"step_reuse ({self.step_reuse}) and max_stale_steps ({self.max_stale_steps}) are two ways of "
                "reusing selections (synchronous every k steps, or asynchronous): set one of them")
        if self.offload and n is not None and n < self.lane_rows:
            raise IceCacheConfigError(
                f"device_kv_tokens ({n}) holds no lane: one decoding request needs {self.lane_rows} rows "
                f"(budget_tokens + page_size + the selections' staleness, max(step_reuse - 1, max_stale_steps)); "
                f"the smallest working size is {self.lane_rows}")
        if self.selection not in POLICIES:
            raise IceCacheConfigError(f"selection must be one of {list(POLICIES)}, got {self.selection!r}")
        if self.gqa_merge not in GQA_MERGES:
            raise IceCacheConfigError(f"gqa_merge must be one of {list(GQA_MERGES)}, got {self.gqa_merge!r}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise IceCacheConfigError(f"decode_attention must be one of {list(DECODE_ATTENTION)}, "
                                      f"got {self.decode_attention!r}")
        if self.dense_attention not in DENSE_ATTENTION:
            raise IceCacheConfigError(f"dense_attention must be one of {list(DENSE_ATTENTION)}, "
                                      f"got {self.dense_attention!r}")
        for name, allowed in (("index", INDEX_KEYS), ("query", QUERY_KEYS)):
            sub = getattr(self, name)
            if not isinstance(sub, dict):
                raise IceCacheConfigError(f"{name} must be a JSON object, got {sub!r}")
            unknown = sorted(set(sub) - set(allowed))
            if unknown:
                raise IceCacheConfigError(f"unknown {name} key(s) {unknown}; known: {list(allowed)}")
        try:
            self.index_config()
            self.query_params()
        except ValueError as e:
            raise IceCacheConfigError(str(e)) from None

    @property
    def max_budget_tokens(self) -> int:
        """The largest budget the indexer can serve with these sink, window and page sizes."""
        return self.sink_tokens + self.window_tokens + MAX_PAGES * self.page_size

    @property
    def lane_rows(self) -> int:
        """Device rows one decoding request needs per layer and KV head with offload: the budget, the recent
        window running up to one page ahead of the indexed range, and one row per step a reused selection
        may be old (it attends to every token indexed since it was made)."""
        return self.budget_tokens + self.page_size + self.reuse_rows

    @property
    def reuse_rows(self) -> int:
        """How many steps old a selection a step attends with may be: ``step_reuse - 1`` (synchronous reuse)
        or ``max_stale_steps`` (asynchronous)."""
        return max(self.step_reuse - 1, self.max_stale_steps)

    @property
    def device_lanes(self) -> int | None:
        """Requests the offloaded decode's device pool holds at once (None without offload)."""
        if not self.offload:
            return None
        return DEFAULT_DEVICE_LANES if self.device_kv_tokens is None else self.device_kv_tokens // self.lane_rows

    @property
    def dense_while_indexing(self) -> bool:
        """Whether a step decodes densely while the indexer is behind (else it waits for it)."""
        return self.while_indexing == "dense" or (self.while_indexing == "auto" and not self.offload)

    @property
    def reuses_selections(self) -> bool:
        """Whether a step may attend with a selection made at an earlier step."""
        return self.step_reuse > 1 or self.max_stale_steps > 0

    @property
    def n_pages(self) -> int:
        """Selected pages per KV head at each decode step."""
        return (self.budget_tokens - self.sink_tokens - self.window_tokens) // self.page_size

    @property
    def candidate_pages(self) -> int:
        """Pages per KV head asked of the indexer: the budget's, times ``token_rerank``."""
        return self.n_pages * self.token_rerank

    def anchor_layers(self, num_layers: int) -> list[int]:
        """The layers that search (and whose keys are indexed): after the dense layers, one in every
        ``layer_reuse``; the layers between reuse the anchor before them."""
        return [layer for layer in range(self.dense_layers, num_layers)
                if (layer - self.dense_layers) % self.layer_reuse == 0]

    def index_config(self) -> IndexConfig:
        return IndexConfig(page_size=self.page_size, **self.index)

    def query_params(self) -> QueryParams:
        return QueryParams(**self.query)

    @classmethod
    def from_json(cls, text: str | None) -> IceCacheConfig:
        if text is None or not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IceCacheConfigError(f"--icecache-config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise IceCacheConfigError(f"--icecache-config must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise IceCacheConfigError(f"unknown --icecache-config key(s) {unknown}; known: {known}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> IceCacheConfig | None:
        """The configuration the launcher exported, or None when IceCache is off."""
        text = os.environ.get(ENV_VAR)
        return None if text is None else cls.from_json(text)
