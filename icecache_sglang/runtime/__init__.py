"""SGLang-facing objects: ``backend`` (the ``icecache`` attention backend; imports SGLang), ``sequences``
(rows and KV slots -> indexer sequences), ``attention`` (sparse decode paths), ``config``, ``metrics``,
``events``. Only ``backend`` imports SGLang, so the rest is usable and testable without it."""
