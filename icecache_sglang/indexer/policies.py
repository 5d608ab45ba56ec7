"""The page-selection policies a ``Query`` may name (``Query.policy``): the index's search and the evaluation
baselines the indexer serves beside it (``baselines.py``). A light module: the launcher validates
``selection`` against it without loading the index."""

BASELINES = ("oracle_page", "oracle_positional", "quest", "streaming")
POLICIES = ("icecache",) + BASELINES
