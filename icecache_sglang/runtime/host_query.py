"""A decode layer's queries on their way to the host, for the indexer.

On a GPU the copy is started without waiting (pinned memory, an event recorded after it): asynchronous
selection (``max_stale_steps``) sends the queries once the copy has landed, at a later anchor layer or
step, so an anchor layer does not stop the host until the GPU has caught up with it (one stall per anchor
layer and step otherwise: the query's device-to-host copy). A query that must be answered in this layer
(a request's first selection, or one past the staleness bound with nothing in flight) is read at once.
On CPU the queries are on the host already.
"""

from __future__ import annotations

import numpy as np
import torch


class HostQuery:
    """Queries ``q [B, H_q, d]`` (the step's sparse requests at one anchor layer) copied to the host:
    bfloat16 as raw 16-bit words (``q_dtype == "bfloat16"``), anything else as float32."""

    def __init__(self, q: torch.Tensor):
        q = q.detach()
        if q.dtype == torch.bfloat16:
            src, self.q_dtype = q.view(torch.int16), "bfloat16"
        else:
            src, self.q_dtype = q.to(torch.float32), None
        self._event = None
        if src.device.type == "cuda":
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(src.device))
        else:
            self._host = src.contiguous()

    def ready(self) -> bool:
        """Whether :meth:`array` returns without waiting for the device."""
        return self._event is None or self._event.query()

    def array(self) -> np.ndarray:
        """The queries on the host (waits for the copy): uint16 words for bfloat16, else float32."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        a = self._host.numpy()
        return a.view(np.uint16) if self.q_dtype == "bfloat16" else a
