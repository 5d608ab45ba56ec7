"""The paged multi-level DCI index (index-spec): pure algorithm, numpy + numba, no SGLang, no ZeroMQ.

``PagedDCIIndex`` is imported on first use, so importing ``index.config`` (the launcher's validation does)
does not load numba."""

from .config import IndexConfig, QueryParams

__all__ = ["IndexConfig", "PagedDCIIndex", "QueryParams"]


def __getattr__(name: str):
    if name == "PagedDCIIndex":
        from .paged_index import PagedDCIIndex

        return PagedDCIIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
