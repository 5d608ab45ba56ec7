#!/usr/bin/env bash
# The test suite: set-up, then pytest over tests/. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# numba's on-disk cache (cache=True) does not notice a change in another module that a cached function calls
# (index/pagetable.py under paged_index.py's kernels): a run after such an edit would test the old code. Drop
# the caches whenever a numba source changed since they were written (a fresh checkout has none).
numba_sources=$(grep -rl --include='*.py' 'njit' icecache_sglang kernels 2>/dev/null | sort || true)
stamp=$( (echo "$numba_sources"; cat $numba_sources) | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.numba-sources 2>/dev/null || true)" != "$stamp" ]; then
  find icecache_sglang kernels \( -name '*.nbi' -o -name '*.nbc' \) -delete 2>/dev/null || true
  echo "$stamp" > .venv/.numba-sources
fi
# A cold cache (a fresh checkout, CI, or the drop above) costs the index's kernels about 2 min of compiling per
# key type: compile them side by side first (scripts/precompile.py) instead of one after the other inside the
# tests, once per set of numba sources (ICECACHE_PRECOMPILE=0 skips it: the tests then compile what they use).
if [ "${ICECACHE_PRECOMPILE:-1}" != 0 ] && [ "$(cat .venv/.numba-precompiled 2>/dev/null || true)" != "$stamp" ]; then
  if PYTHONSAFEPATH=1 timeout 1200 .venv/bin/python scripts/precompile.py; then  # a hang costs 20 min, not CI
    echo "$stamp" > .venv/.numba-precompiled
  else
    echo "precompile failed; the tests compile what they use" >&2
  fi
fi
# Keep the repository root off sys.path: its kernels/ folder would shadow the PyPI package SGLang imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python -m pytest "$@"
