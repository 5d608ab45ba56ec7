"""Layer reuse (index-spec section 5.3 item 8): groups of ``reuse`` consecutive layers share one index.

Only the group's first layer (the anchor) keeps a tree and searches; the other layers write their own
K/V into the anchor's ``(page, slot)`` layout and attend to the anchor's selected pages.
"""

from __future__ import annotations

import numpy as np

from .paged_index import PagedDCIIndex


def anchor_layer(layer: int, n_dense_layers: int, reuse: int) -> int | None:
    """The layer whose index ``layer`` uses, or None for a dense layer (``layer < n_dense_layers``)."""
    if reuse < 1 or n_dense_layers < 0 or layer < 0:
        raise ValueError(f"need layer >= 0, n_dense_layers >= 0, reuse >= 1; got {layer}, {n_dense_layers}, {reuse}")
    if layer < n_dense_layers:
        return None
    return n_dense_layers + ((layer - n_dense_layers) // reuse) * reuse


class FollowerLayer:
    """A non-anchor layer: its own K/V, laid out by the anchor index's page table."""

    def __init__(self, anchor: PagedDCIIndex):
        self.anchor = anchor
        self.keys = np.zeros((anchor.H, 0, anchor.d), np.float32)
        self.values = np.zeros((anchor.H, 0, max(anchor.dv, 0)), np.float32)

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append this layer's K/V for the tokens the anchor indexed last (same token ids, in order)."""
        keys = np.asarray(keys, np.float32)
        values = np.asarray(values, np.float32)
        if keys.shape[0] != self.anchor.H or keys.shape[2] != self.anchor.d or values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"keys/values must be [{self.anchor.H}, n, d]/[{self.anchor.H}, n, dv]")
        self.keys = np.concatenate([self.keys, keys], axis=1)
        self.values = np.concatenate([self.values, values], axis=1)
        if self.keys.shape[1] != self.anchor.n_tokens:
            raise ValueError(f"follower holds {self.keys.shape[1]} tokens, the anchor {self.anchor.n_tokens}")

    def page_kv(self, h: int, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This layer's K, V ``[len(pages), C, d]`` in the anchor's slot order, and each page's fill."""
        a = self.anchor
        pages = np.asarray(pages, dtype=np.int64)
        toks = a.page_tok[h, pages]
        fill = a.page_fill[h, pages]
        valid = np.arange(a.C)[None] < fill[:, None]
        safe = np.where(valid, toks, 0)
        K = np.where(valid[..., None], self.keys[h][safe], 0)
        V = np.where(valid[..., None], self.values[h][safe], 0)
        return K, V, fill
