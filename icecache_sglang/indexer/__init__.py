"""The CPU indexing process: per-(sequence, layer) DCI trees behind ZeroMQ, fed through shared memory.

``protocol`` (every wire message), ``keystore`` (the shared key segment and the private directory),
``config``, ``sequences`` (copy-on-write table of indexes), ``service`` (request handling, no sockets),
``server`` (the child process), ``client`` (pipelining, deadlines, fallback, ledger), ``launcher``
(spawn, ready check, restart, cleanup). See docs/architecture.md.
"""

from .client import (
           IndexerClient,
           IndexerError,
           IndexerTimeout,
           IndexerUnavailable,
           Selection,
)
from .config import IndexerConfig
from .keystore import KeyStore, KeyStoreSpec, PrivateDir
from .launcher import Indexer, IndexerProcess, IndexerStartError
from .protocol import PROTOCOL_VERSION

__all__ = [
           "PROTOCOL_VERSION",
           "Indexer",
           "IndexerClient",
           "IndexerConfig",
           "IndexerError",
           "IndexerProcess",
           "IndexerStartError",
           "IndexerTimeout",
           "IndexerUnavailable",
           "KeyStore",
           "KeyStoreSpec",
           "PrivateDir",
           "Selection",
]
