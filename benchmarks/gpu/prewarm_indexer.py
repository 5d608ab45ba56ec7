"""Compile the indexer's numba functions ahead of the IceCache server (``serve_gpu.sh`` runs it in the
background while the dense server is measured). On a bare machine the first indexer process compiles them
before it reports ready: about 90 s of the IceCache server's launch on the H200 (bringup/attempt3). With
``cache=True`` the compiled code lands beside the installed sources, where the server's indexer loads it."""
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
from icecache_sglang.indexer.launcher import Indexer  # noqa: E402
from icecache_sglang.runtime.config import IceCacheConfig  # noqa: E402


def main() -> None:
    t = time.perf_counter()
    ind = Indexer.launch(num_layers=2, num_kv_heads=8, head_dim=128, num_slots=4096, rank=0, key_dtype="bfloat16",
                         index=IceCacheConfig().index_config(), timeout_s=5.0)
    print(f"indexer compiled and ready in {time.perf_counter() - t:.1f} s")
    ind.close()


if __name__ == "__main__":  # the indexer is a spawned process
    main()
