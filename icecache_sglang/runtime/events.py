"""Events from SGLang's internals, delivered to the IceCache backend.

``patches/allocator.py`` calls :func:`slots_freed` / :func:`slots_cleared` after SGLang's token allocators
free slots or reset; ``patches/forward_batch.py`` calls :func:`extend_batch` when SGLang builds an extend
batch (which of its requests' chunks end their prompts, in the batch's order), read back with
:func:`prompt_ends`. This module
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


#: the latest extend batch of this process: per request, in the batch's order, whether its chunk ends the prompt
_prompt_ends: list[bool] = []


def extend_batch(final: list[bool]) -> None:
    """SGLang built an extend batch (its forward pass follows on the same thread)."""
    _prompt_ends[:] = final


def prompt_ends(batch_size: int) -> list[bool] | None:
    """Per request of the current extend batch, whether its chunk ends its prompt (None: not known)."""
    return list(_prompt_ends) if len(_prompt_ends) == batch_size else None
