"""The GPU path's host-resident KV: the hot-page cache map, the page loader and one layer's decode step."""

from .hot_pages import HotAssignment, HotPageMap
from .loader import MODES, PageLoader
from .step import OffloadedDecodeLayer, StepInputs, StepStats

__all__ = ["HotAssignment", "HotPageMap", "MODES", "OffloadedDecodeLayer", "PageLoader", "StepInputs", "StepStats"]
