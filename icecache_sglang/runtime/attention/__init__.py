"""Sparse decode attention paths behind one interface (``base.py``): ``torch_native`` (the CPU path and the
reference) and ``flashinfer`` (the GPU path: one FlashInfer decode sequence per (request, KV head))."""

import torch

from .base import DecodePlan, SparseDecodeAttention
from .flashinfer import FlashInferSparseDecode, GraphDecodeBuffers
from .torch_native import TorchSparseDecode, rows_decode_reference



def flashinfer_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


def decode_attention_for(name: str, device: torch.device) -> SparseDecodeAttention:
    """The decode path a ``decode_attention`` setting (``auto``/``torch``/``flashinfer``) means on ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    if name == "flashinfer" or (name == "auto" and on_cuda and flashinfer_importable()):
        if not on_cuda:
            raise ValueError("decode_attention 'flashinfer' needs the KV cache on a CUDA device")
        return FlashInferSparseDecode(device)
    return TorchSparseDecode()


__all__ = ["DecodePlan", "FlashInferSparseDecode", "GraphDecodeBuffers", "SparseDecodeAttention",
           "TorchSparseDecode", "decode_attention_for", "flashinfer_importable",
           "rows_decode_reference"]
