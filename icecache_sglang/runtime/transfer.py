"""Host arrays to the device without stalling the stream: the planner's plans and the device pool's indices."""

from __future__ import annotations

import numpy as np
import torch


def host_for(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array as a tensor to be copied to ``device``: pinned for a GPU (a copy from pageable memory
    returns only once the stream's earlier work is done: one stall per anchor layer)."""
    t = torch.from_numpy(a)
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def to_device(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array on ``device``, to a GPU without waiting (:func:`host_for`)."""
    return host_for(a, device).to(device, non_blocking=True)
