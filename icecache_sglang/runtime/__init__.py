"""SGLang-facing objects. Built: `config` (the validated `--icecache-config`). Planned (issue 4): memory
pool, attention backend, radix cache, metrics."""
