"""The interface of a sparse decode attention path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class DecodePlan:
    """The KV slots each (request, KV head) attends at one decode step: ``slots [B, H_kv, T]`` (int64,
    padding entries hold any valid slot) and ``valid [B, H_kv, T]`` (bool). A GQA group's query heads share
    their KV head's row. Built once per step (sink + selected pages + recent tokens) and reused by every
    layer that shares the selection.

    The planner, which lays plans out on the host, also gives them in the compact form a paged decode
    kernel takes, so that no attention path reads a plan's layout back from the device: ``indptr`` (host,
    int32 ``[B*H_kv + 1]``: offsets of each (request, KV head)'s valid entries), ``rows`` (int32, on the
    plan's device: ``slot * H_kv + h`` of the valid entries, in order) and ``tokens`` (host, ``[B, H_kv]``
    valid entries). None when a plan is made without them (an attention path then derives them). A planner
    for an attention path that reads only the compact form (``SparseDecodeAttention.reads_slots`` false)
    leaves ``slots`` and ``valid`` out (None): it lays out only the compact form."""

    slots: torch.Tensor | None
    valid: torch.Tensor | None
    indptr: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    @property
    def tokens_per_head(self) -> torch.Tensor:
        """Attended tokens per (request, KV head): ``[B, H_kv]`` (on the host when the planner gave them)."""
        return self.tokens if self.tokens is not None else self.valid.sum(-1)


class SparseDecodeAttention(ABC):
    """Decode attention of one layer over a :class:`DecodePlan`."""

    #: whether :meth:`decode` reads the plan's ``slots`` / ``valid`` (else only ``indptr`` / ``rows``)
    reads_slots = True

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan,
               scale: float) -> torch.Tensor:
        """``q [B, H_q, d]``, ``k_cache [S, H_kv, d]``, ``v_cache [S, H_kv, d_v]`` (the layer's whole pool);
        returns ``[B, H_q, d_v]`` in ``q``'s dtype."""
