"""Sparse decode attention paths behind one interface (``base.py``): ``torch_native`` (the CPU path and the
reference), ``flashinfer`` (the GPU path: one FlashInfer decode sequence per (request, KV head)) and
``triton_decode`` (the same sequences with IceCache's Triton kernels: no host plan per layer)."""

import torch

from .base import DecodePlan, SparseDecodeAttention
from .flashinfer import FlashInferSparseDecode, GraphDecodeBuffers
from .torch_native import TorchSparseDecode, rows_decode_reference
from .triton_decode import TritonSparseDecode



def flashinfer_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


def decode_attention_for(name: str, device: torch.device) -> SparseDecodeAttention:
    """The decode path a ``decode_attention`` setting (``auto``/``torch``/``flashinfer``/``triton``) means on
    ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    if name == "triton":
        if not on_cuda:
            raise ValueError("decode_attention 'triton' needs the KV cache on a CUDA device")
        return TritonSparseDecode()
    if name == "flashinfer" or (name == "auto" and on_cuda and flashinfer_importable()):
        if not on_cuda:
            raise ValueError("decode_attention 'flashinfer' needs the KV cache on a CUDA device")
        return FlashInferSparseDecode(device)
    return TorchSparseDecode()


__all__ = ["DecodePlan", "FlashInferSparseDecode", "GraphDecodeBuffers", "SparseDecodeAttention",
           "TorchSparseDecode", "TritonSparseDecode", "decode_attention_for", "flashinfer_importable",
           "rows_decode_reference"]
