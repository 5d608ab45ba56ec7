"""The paged multi-level DCI index (index-spec): pure algorithm, numpy + numba, no SGLang, no ZeroMQ."""

from .config import IndexConfig, QueryParams
from .paged_index import PagedDCIIndex

__all__ = ["IndexConfig", "PagedDCIIndex", "QueryParams"]
