"""SGLang-facing objects (memory pool, attention backend, radix cache). Not built yet: see issue 4."""
