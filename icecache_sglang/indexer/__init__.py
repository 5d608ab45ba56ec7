"""The CPU indexing process: per-(sequence, layer) DCI trees behind ZeroMQ, fed through shared memory.

``protocol`` (every wire message), ``keystore`` (the shared key segment and the private directory),
``config``, ``sequences`` (copy-on-write table of indexes), ``service`` (request handling, no sockets),
``server`` (the child process), ``client`` (pipelining, deadlines, fallback, ledger), ``launcher``
(spawn, ready check, restart, cleanup). See docs/architecture.md.

Names are imported on first use, so a light module (``indexer.config``, ``indexer.policies``) can be
imported without loading ZeroMQ, numba or the index.
"""

from importlib import import_module

_WHERE = {
    "IndexerClient": "client", "IndexerError": "client", "IndexerTimeout": "client", "IndexerUnavailable": "client",
    "Selection": "client", "IndexerConfig": "config", "KeyStore": "keystore", "KeyStoreSpec": "keystore",
    "PrivateDir": "keystore", "Indexer": "launcher", "IndexerProcess": "launcher", "IndexerStartError": "launcher",
    "PROTOCOL_VERSION": "protocol",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
