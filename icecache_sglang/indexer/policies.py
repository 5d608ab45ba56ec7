"""The page-selection policies a ``Query`` may name (``Query.policy``). A light module: the launcher validates
``selection`` against it without loading the index.

- ``exact``: IceCache's own (semantic) pages ranked by their exact best score, by the tight scan of
  ``index/scan.py`` (every key read once per KV head). The server's default: on CPU it is no slower than the
  tree search at any measured context (``benchmarks/index_speed.py``) and never misses the page that exact
  scoring ranks first, which the search does in a few percent of cases (``benchmarks/page_bounds.py``).
- ``lowrank``: the same exact ranking of the pages it rescores, which a query-aware low-rank first pass over
  a fraction of the key bytes picks (``index/lowrank.py``: each query head's best ``4 P`` pages by approximate
  scores, rescored); an index under 16384 tokens, or one that has not yet answered enough
  queries to fit its codes, is scanned exactly.
- ``lowrank_pages``: ``lowrank`` with a page stage before the first pass: each query head ranks every page by
  its summary (its tokens' mean code and their spread along the query) and only the tokens of its KV head's best
  ``16 P`` pages per query head are scored (``index/lowrank.py``, ``summary_pages``); faster at long contexts,
  and it misses the exact best page a little more often than ``lowrank`` (99.07% / 98.70% kept on Qwen's
  essays / passkey prompts at 16k against 99.21% / 98.79%, ``benchmarks/lowrank_scan.py``).
- ``icecache``: the index's M-DCI tree search (index-spec section 3.3).
- the evaluation baselines the indexer serves beside them (``baselines.py``): ``oracle_page`` (the same
  ranking as ``exact``, under its evaluation name), ``oracle_positional``, ``quest``, ``streaming``.
"""

BASELINES = ("oracle_page", "oracle_positional", "quest", "streaming")
SEARCHES = ("exact", "lowrank", "lowrank_pages", "icecache")
POLICIES = SEARCHES + BASELINES
