"""Parameters of the paged M-DCI index, validated where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_PAGE_SIZE = 1024
#: levels an index keeps (``PagedDCIIndex.level_counts``' columns; ``tok_level`` is int8)
MAX_LEVELS = 64
#: the largest ``p_up``: with it a tree of 2^31 tokens has at most 32 levels, whatever ``p0``
MAX_P_UP = 0.5
#: how a cell's children are cut into pages (index/layout.py)
LAYOUTS = ("projection", "bisect")
#: share of a frontier cell's children scored exactly. 1.0 (every child of the cells the frontier reaches):
#: at 0.8 the search missed the exact best page in 4-5% of cases on real Q/K (benchmarks/page_bounds.py)
DEFAULT_PROP_TO_RETRIEVE = 1.0
#: how a KV head's query heads share its pages (index/gqa_merge.py): rank-major, or heads' best pages then
#: estimated attention mass (0.4-3% more attention at equal tokens on real Q/K, benchmarks/page_layout.py)
GQA_MERGES = ("rank", "mass")
DEFAULT_GQA_MERGE = "mass"
#: level-0 parents are searched within runs of this many tokens of a build (IndexConfig.parent_segment)
DEFAULT_PARENT_SEGMENT: int | None = 8192
#: the widest search frontier (and per-cell retrieve count) a query may ask for: more than any cell holds
MAX_FOV = 1 << 30


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a probability in (0, 1), got {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """Build-time parameters (index-spec section 6, the [R] defaults).

    page_size: tokens per physical page (C). ``p0`` defaults to ``0.01 * 16 / page_size`` so that
    level-1 cells hold about 6-7 pages whatever C is.
    rebuild_growth: rebuild the whole tree once the live token count reaches ``growth`` times the
    count at the last build (decode inserts land on level 0 and would otherwise freeze the upper
    levels); ``None`` disables it.
    key_dtype: how the index keeps key rows: ``"float32"``, or ``"bfloat16"`` (half the bytes; keys are
    rounded to bfloat16 on the way in and the index then behaves exactly as a float32 index over the rounded
    keys). ``None``: float32 (the indexer picks bfloat16 for bfloat16/float16 KV caches).
    layout: how a cell's children are cut into pages (``layout.py``): ``projection`` (runs along the one
    random projection, the spec's) or ``bisect`` (recursive balanced bisection of similar keys).
    parent_segment: a build gives each level-0 token its exact nearest level-1 token within its run of about
    this many tokens of the build order (``transform.segment_bounds``), not within the whole prompt; ``None``:
    the whole prompt (the spec's). The build's cost is this search (``n x n p0 x (d+1)`` per head for the
    whole prompt, ``n x segment p0 x (d+1)`` in runs).
    """

    page_size: int = 16
    p0: float | None = None
    p_up: float = 0.2
    seed: int = 0
    faithful_proj_scale: bool = False
    rebuild_growth: float | None = 2.0
    parent_chunk: int = 8192
    key_dtype: str | None = None
    layout: str = "bisect"
    parent_segment: int | None = DEFAULT_PARENT_SEGMENT

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or not (2 <= self.page_size <= MAX_PAGE_SIZE):
            raise ValueError(f"page_size must be an int in [2, {MAX_PAGE_SIZE}], got {self.page_size!r}")
        if self.p0 is not None:
            _check_prob("p0", self.p0)
        _check_prob("p_up", self.p_up)
        if self.p_up > MAX_P_UP:  # levels ~ 1 + log(n p0) / log(1 / p_up): at most 32 for 2^31 tokens
            raise ValueError(f"p_up must be at most {MAX_P_UP}, got {self.p_up!r}: the tree has about "
                             f"1 + log(n p0) / log(1 / p_up) levels (p_up 0.9: 81 at 1M tokens) and keeps at most "
                             f"{MAX_LEVELS}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.rebuild_growth is not None and not (
            isinstance(self.rebuild_growth, (int, float)) and self.rebuild_growth > 1.0
        ):
            raise ValueError(f"rebuild_growth must be > 1 or None, got {self.rebuild_growth!r}")
        if self.key_dtype is not None and self.key_dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"key_dtype must be 'float32', 'bfloat16', 'int8' or None, got {self.key_dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.parent_segment is not None and (not isinstance(self.parent_segment, int)
                                                or isinstance(self.parent_segment, bool) or self.parent_segment < 256):
            raise ValueError(f"parent_segment must be an int >= 256 or None, got {self.parent_segment!r}")
        if not isinstance(self.parent_chunk, int) or self.parent_chunk < 1:
            raise ValueError(f"parent_chunk must be a positive int, got {self.parent_chunk!r}")

    @property
    def storage_dtype(self) -> str:
        """The key dtype the index keeps (``key_dtype``, float32 when unset)."""
        return self.key_dtype or "float32"

    @property
    def level0_prob(self) -> float:
        return self.p0 if self.p0 is not None else min(0.5, 0.01 * 16 / self.page_size)


@dataclass(frozen=True)
class QueryParams:
    """Decode-time search parameters.

    fov: frontier width per level (None: ``max(30, ceil(1.5e-3 * n))``).
    prop_to_retrieve: share of a cell's children scored exactly (nearest in projection first).
    num_to_retrieve: lower bound on children scored per cell.
    """

    fov: int | None = None
    prop_to_retrieve: float = DEFAULT_PROP_TO_RETRIEVE
    num_to_retrieve: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.fov is not None and (not isinstance(self.fov, int) or isinstance(self.fov, bool)
                                     or not 1 <= self.fov <= MAX_FOV):
            raise ValueError(f"fov must be an int in [1, {MAX_FOV}] or None, got {self.fov!r}")
        p = self.prop_to_retrieve
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 < p <= 1.0):
            raise ValueError(f"prop_to_retrieve must be in (0, 1], got {p!r}")
        if (not isinstance(self.num_to_retrieve, int) or isinstance(self.num_to_retrieve, bool)
                or not 0 <= self.num_to_retrieve <= MAX_FOV):
            raise ValueError(f"num_to_retrieve must be a non-negative int, got {self.num_to_retrieve!r}")

    def fov_for(self, n_tokens: int) -> int:
        if self.fov is not None:
            return self.fov
        return max(30, math.ceil(1.5e-3 * n_tokens))
