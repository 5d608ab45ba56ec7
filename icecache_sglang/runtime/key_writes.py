"""New keys into the indexer's key store, when SGLang's KV pool does not hold them there itself.

A KV pool in host memory *is* the key store (``pool/kv_pool.py``: its anchor K planes are the store's
layers), and nothing is copied. A pool in device memory (a GPU) keeps its own keys, and the anchor layers'
new keys are copied to the store: a prefill chunk's right after each layer (one copy per layer per chunk),
a decode step's **once per step**: each anchor layer gathers its new rows on the device (no host sync) and
the last layer of the step moves them all to the host in one copy. Before, each anchor layer copied its own
rows to the host, a device-to-host sync per layer per decode step (~30 for Llama-3.1-8B) that kept the CPU
from queueing the next layer's kernels ahead of the GPU.

The store is read for a token only once it has left the recent window (the tracker indexes positions up to
``seq_len - window``, the next step at the earliest), so a step's keys land in time.
"""

from __future__ import annotations

import torch

from ..indexer.keystore import KeyStore


class KeyStoreWriter:
    """Copies the anchor layers' keys from SGLang's KV pool into ``store`` (``store_layer``: model layer ->
    store layer). ``shared``: the pool's K planes are the store, and every call is a no-op."""

    def __init__(self, pool, store: KeyStore, store_layer: dict[int, int], shared: bool):
        self.pool, self.store, self.store_layer, self.shared = pool, store, store_layer, shared
        self._loc: torch.Tensor | None = None  # the decode step's slots (the same at every layer)
        self._staged: list[tuple[int, torch.Tensor]] = []  # (store layer, keys [B, H, d] on the pool's device)

    def _rows(self, layer_id: int, loc: torch.Tensor) -> torch.Tensor:
        H, d = self.pool.head_num, self.pool.head_dim
        return self.pool.get_key_buffer(layer_id)[loc.to(torch.int64)].detach().reshape(-1, H, d)

    def write_now(self, layer_id: int, loc: torch.Tensor | None) -> None:
        """A prefill chunk's keys of ``layer_id`` at ``loc``, copied to the store now."""
        i = self.store_layer.get(layer_id)
        if self.shared or i is None or loc is None or loc.numel() == 0:
            return
        self.store.write(i, loc.cpu().numpy(), _host_words(self._rows(layer_id, loc)))

    def stage(self, layer_id: int, loc: torch.Tensor | None) -> None:
        """A decode step's keys of ``layer_id`` at ``loc``, gathered on the pool's device (no sync); written
        by :meth:`flush`."""
        i = self.store_layer.get(layer_id)
        if self.shared or i is None or loc is None or loc.numel() == 0:
            return
        if self._loc is not None and (self._loc.shape != loc.shape or self._loc.data_ptr() != loc.data_ptr()):
            self.flush()  # another batch's slots: write what the earlier one staged first
        self._loc = loc
        self._staged.append((i, self._rows(layer_id, loc)))

    def flush(self) -> None:
        """Write every staged layer: one device-to-host copy of all their keys (and one of the step's slots),
        then the store's rows."""
        if not self._staged:
            self._loc = None
            return
        staged, loc = self._staged, self._loc
        self._staged, self._loc = [], None
        keys, slots = _host_words(torch.stack([k for _, k in staged])), loc.cpu().numpy()
        for j, (i, _) in enumerate(staged):
            self.store.write(i, slots, keys[j])


def _host_words(keys: torch.Tensor):
    """Keys as the store holds them, on the host (bfloat16 as its 16-bit words)."""
    return (keys.view(torch.int16) if keys.dtype == torch.bfloat16 else keys).cpu().numpy()
