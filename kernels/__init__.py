"""Triton/GPU kernels, installed as ``icecache_sglang.kernels``. Not built yet: see issue 6."""
