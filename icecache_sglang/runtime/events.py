"""Events from SGLang's internals, delivered to the IceCache backend.

``patches/allocator.py`` calls :func:`slots_freed` / :func:`slots_cleared` after SGLang's token allocators
free slots or reset; ``patches/forward_batch.py`` calls :func:`extend_batch` when SGLang builds an extend
batch (which of its requests' chunks end their prompts), read back with :func:`ends_prompt`. This module
imports nothing from SGLang, so the runtime stays testable without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

_freed: list[Callable[[np.ndarray], None]] = []
_cleared: list[Callable[[], None]] = []


def subscribe(on_freed: Callable[[np.ndarray], None], on_cleared: Callable[[], None]) -> None:
    _freed.append(on_freed)
    _cleared.append(on_cleared)


def unsubscribe(on_freed, on_cleared) -> None:
    if on_freed in _freed:
        _freed.remove(on_freed)
    if on_cleared in _cleared:
        _cleared.remove(on_cleared)


def slots_freed(slots) -> None:
    if not _freed:
        return
    arr = slots.detach().to("cpu").numpy() if hasattr(slots, "detach") else np.asarray(slots)
    for fn in _freed:
        try:
            fn(arr)
        except Exception:
            logger.exception("IceCache: slot-free listener failed")


def slots_cleared() -> None:
    for fn in _cleared:
        try:
            fn()
        except Exception:
            logger.exception("IceCache: slot-clear listener failed")


#: the latest extend batch of this process: req_to_token row -> whether its chunk ends the prompt
_last_chunk: dict[int, bool] = {}


def extend_batch(rows_final: dict[int, bool]) -> None:
    """SGLang built an extend batch (its forward pass follows on the same thread)."""
    _last_chunk.clear()
    _last_chunk.update(rows_final)


def ends_prompt(row: int) -> bool | None:
    """Whether the current extend batch's chunk for ``row`` ends its prompt (None: not known)."""
    return _last_chunk.get(row)
