"""Compile FlashInfer's decode kernel IceCache's sparse decode uses (bf16, head_dim 128, page size 1) ahead of
the server, and check it against torch on one small plan. Run in the background by ``serve_gpu.sh`` while
the dense server is measured: its JIT build (nvcc, about a minute) lands in ``FLASHINFER_WORKSPACE_BASE``,
where the IceCache server finds it."""
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[2]))
from icecache_sglang.runtime.attention import DecodePlan, FlashInferSparseDecode, TorchSparseDecode  # noqa: E402

t = time.time()
torch.manual_seed(0)
S, H, G, d, T = 4096, 8, 4, 128, 300
k = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(S, H, d, device="cuda", dtype=torch.bfloat16)
q = torch.randn(2, H * G, d, device="cuda", dtype=torch.bfloat16)
slots = torch.randint(0, S, (2, H, T), device="cuda")
valid = torch.rand(2, H, T, device="cuda") < 0.8
plan = DecodePlan(slots, valid)
got = FlashInferSparseDecode("cuda").decode(q, k, v, plan, d ** -0.5)
ref = TorchSparseDecode().decode(q, k, v, plan, d ** -0.5)
err = (got.float() - ref.float()).abs().max().item()
print(f"flashinfer sparse decode: built and ran in {time.time() - t:.1f} s, max abs err vs torch {err:.2e}")
sys.exit(0 if err < 2e-2 else 1)
