"""The server's run directory: the one place where SGLang's HTTP process and the TP ranks' schedulers
exchange files (the ranks' stats snapshots, the settings ``POST /icecache/config`` publishes).

It is created once per server by the launching process (``patches/cli.py``) as a private directory
(``indexer.keystore.PrivateDir``: mode 0700, an unpredictable name, on ``/dev/shm``, removed at exit or
swept by the next server once its creator is gone) and handed to the spawned schedulers in
``$ICECACHE_RUN_DIR``. Every access re-checks it, so nothing another local user prepared is ever read or
written through:

- the directory must be a real directory (not a symlink), owned by this user, with no group/other access;
- files are read with ``O_NOFOLLOW`` and must be regular files owned by this user, of bounded size;
- files are written to an exclusive temporary file (``mkstemp``, mode 0600) and renamed over the target
  (a rename replaces a planted symlink itself, it never writes through it).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import stat
import tempfile
from pathlib import Path

#: the environment variable that hands the run directory to SGLang's spawned scheduler processes
ENV_RUN_DIR = "ICECACHE_RUN_DIR"
#: a control or snapshot file larger than this is refused (ours are a few KiB)
MAX_FILE_BYTES = 1 << 20

CONTROL_FILE = "control.json"


def snapshot_name(rank: int) -> str:
    return f"rank-{int(rank)}.json"


class RunDirError(RuntimeError):
    """The run directory or one of its files is not what this server created."""


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, root: str | None = None) -> RunDir:
        """A new private directory (removed when this process exits)."""
        from ..indexer.keystore import PrivateDir

        pdir = PrivateDir.create(root)
        atexit.register(pdir.cleanup)
        rd = cls(pdir.path)
        rd.verify()
        return rd

    @classmethod
    def from_env(cls) -> RunDir | None:
        """The run directory of this server (``$ICECACHE_RUN_DIR``), checked; None when unset."""
        path = os.environ.get(ENV_RUN_DIR)
        if not path:
            return None
        rd = cls(path)
        rd.verify()
        return rd

    def export(self) -> None:
        os.environ[ENV_RUN_DIR] = str(self.path)

    # ------------------------------------------------------------------ checks
    def verify(self) -> None:
        """Raise :class:`RunDirError` unless the directory is ours and private."""
        try:
            st = os.lstat(self.path)
        except OSError as e:
            raise RunDirError(f"run directory {self.path}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"run directory {self.path} is not a directory (a symlink or a file)")
        if st.st_uid != os.getuid():
            raise RunDirError(f"run directory {self.path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.getuid()})")
        if st.st_mode & 0o077:
            raise RunDirError(f"run directory {self.path} is open to other users (mode {st.st_mode & 0o777:o}); "
                              "it must be 0700")

    # ------------------------------------------------------------------ files
    def write_json(self, name: str, data: dict) -> Path:
        """Atomically replace ``name`` with ``data`` (exclusive temporary file, then a rename)."""
        self.verify()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)  # O_EXCL, mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            target = self.path / name
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target

    def read_json(self, name: str) -> dict | None:
        """The JSON object in ``name``; None when there is none. Raises :class:`RunDirError` for a file that
        is not ours (a symlink, another owner, not a regular file, too large) or not a JSON object."""
        self.verify()
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunDirError(f"{name} in the run directory is a symlink; refused") from None
            raise RunDirError(f"{name}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RunDirError(f"{name} in the run directory is not a regular file; refused")
            if st.st_uid != os.getuid():
                raise RunDirError(f"{name} in the run directory belongs to uid {st.st_uid}; refused")
            if st.st_size > MAX_FILE_BYTES:
                raise RunDirError(f"{name} in the run directory has {st.st_size} bytes (at most {MAX_FILE_BYTES})")
            raw = f.read(MAX_FILE_BYTES + 1)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise RunDirError(f"{name} in the run directory is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{name} in the run directory is not a JSON object")
        return data

    def mtime_ns(self, name: str) -> int | None:
        """Modification time of ``name`` (of a symlink itself, never its target); None when absent."""
        try:
            return os.lstat(self.path / name).st_mtime_ns
        except OSError:
            return None

    def unlink(self, name: str) -> None:
        try:
            os.unlink(self.path / name)
        except FileNotFoundError:
            pass

    def names(self, prefix: str, suffix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.path) if n.startswith(prefix) and n.endswith(suffix))
        except OSError:
            return []
