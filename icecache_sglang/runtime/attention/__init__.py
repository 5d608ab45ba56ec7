"""Sparse decode attention paths behind one interface (``base.py``): ``torch_native`` (CPU and reference);
the FlashInfer per-KV-head path of issue #6 implements the same interface."""

from .base import DecodePlan, SparseDecodeAttention
from .torch_native import TorchSparseDecode

__all__ = ["DecodePlan", "SparseDecodeAttention", "TorchSparseDecode"]
