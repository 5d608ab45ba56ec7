"""Edits to the carried SGLang 0.5.23 (in /tmp/site) that the GPU machine needs, each with its reason; applied by
``serve_gpu.sh`` after unpacking. Fails loudly when an edit's anchor text is not found (another SGLang)."""
import sys
from pathlib import Path

SITE = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/site")

EDITS = [
    # Llama/Qwen2 MLPs build a DualGemm, whose mode selection imports the SM100-only CuTe-DSL dual GEMM
    # (``import cutlass``: nvidia-cutlass-dsl, not carried) before it checks the GPU. On sm90 the kernel is never
    # used (can_use_dual_gemm requires SM100), so without the package the mode is None, as on sm90 with it.
    ("sglang/srt/layers/dual_gemm.py",
     "        if not is_cuda():\n            return None\n",
     "        if not is_cuda():\n            return None\n"
     "        try:  # icecache-sglang GPU recipe: nvidia-cutlass-dsl is not carried; the kernel is SM100-only\n"
     "            import cutlass  # noqa: F401\n"
     "        except ImportError:\n"
     "            return None\n"),
]

for rel, old, new in EDITS:
    path = SITE / rel
    text = path.read_text()
    if new in text:
        continue
    if text.count(old) != 1:
        sys.exit(f"patch_sglang: anchor not found once in {path}")
    path.write_text(text.replace(old, new))
    print(f"patched {rel}")
