"""What one indexer process is started with; travels to the spawned child as JSON (never pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..index.config import IndexConfig
from .keystore import KeyStoreSpec

#: the largest decode batch one Query message may carry
MAX_BATCH = 64
#: the most pages one Query may ask for per KV head
MAX_PAGES = 4096
#: sun_path of a Unix socket holds 108 bytes including the terminating NUL
MAX_IPC_PATH = 107
#: OpenBLAS threads of the indexer process by default (``IndexerConfig.blas_threads``)
BLAS_THREADS = 1


@dataclass(frozen=True)
class IndexerConfig:
    """rank: the tensor-parallel rank served (each rank holds its own KV heads).
    store: the shared key store the runtime writes and the indexer reads.
    endpoint: ``ipc://`` path of the indexer's ROUTER socket, inside the server's private directory.
    private_dir: that directory; the indexer removes it if its parent dies without cleaning up.
    index: parameters of every per-layer index (page size, seed, level probabilities, rebuild growth).
    threads: numba threads for the search and inserts (None: every core this process may use).
    write_workers: threads that index the layers of one Build or Insert side by side, each with an even
    share of ``threads`` (None: one per thread, at most 8; 1: one layer after another).
    blas_threads: OpenBLAS threads of the process (``indexer/blas.py``; None: NumPy's default, every core).
    One: the indexer's parallel work runs on numba's threads, and a multi-threaded BLAS under the write
    workers made a 32k Build of 4 layers 1.4x slower on 2 cores (``benchmarks/build_workers.py --blas``).
    max_batch / max_pages: limits a Query must respect (larger ones get an error reply).
    trim_rebuild_ratio: a Share that cuts more than this share of the source's tokens rebuilds the prefix
    from its keys instead of deleting the tail one token at a time.
    """

    rank: int
    store: KeyStoreSpec
    endpoint: str
    private_dir: str
    index: IndexConfig = field(default_factory=IndexConfig)
    threads: int | None = None
    write_workers: int | None = None
    blas_threads: int | None = BLAS_THREADS
    max_batch: int = MAX_BATCH
    max_pages: int = MAX_PAGES
    trim_rebuild_ratio: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {self.rank!r}")
        if not self.endpoint.startswith("ipc://"):
            raise ValueError(f"endpoint must be an ipc:// path, got {self.endpoint!r}")
        if len(self.endpoint[len("ipc://"):].encode()) > MAX_IPC_PATH:
            raise ValueError(f"ipc socket path is longer than the {MAX_IPC_PATH} bytes a Unix socket allows: "
                             f"{self.endpoint!r}; use a shorter private directory root")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.write_workers is not None and (not isinstance(self.write_workers, int) or isinstance(
                self.write_workers, bool) or not 1 <= self.write_workers <= 64):
            raise ValueError(f"write_workers must be an int in [1, 64] or None, got {self.write_workers!r}")
        if self.blas_threads is not None and (not isinstance(self.blas_threads, int)
                                              or isinstance(self.blas_threads, bool) or self.blas_threads < 1):
            raise ValueError(f"blas_threads must be a positive int or None, got {self.blas_threads!r}")
        for name, v in (("max_batch", self.max_batch), ("max_pages", self.max_pages)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (0.0 <= self.trim_rebuild_ratio <= 1.0):
            raise ValueError(f"trim_rebuild_ratio must be in [0, 1], got {self.trim_rebuild_ratio!r}")

    @property
    def page_size(self) -> int:
        return self.index.page_size

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> IndexerConfig:
        d = json.loads(text)
        d["store"] = KeyStoreSpec(**d["store"])
        d["index"] = IndexConfig(**d["index"])
        return cls(**d)
