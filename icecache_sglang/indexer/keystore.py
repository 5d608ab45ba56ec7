"""The shared key store: host-side keys of every layer in one shared-memory segment.

The runtime writes each token's keys once, at its KV slot, as ``set_kv_buffer`` runs; the indexer
process maps the same segment read-only and reads the rows a Build or Insert names. Nothing of the keys
crosses the socket, so a 128k-token prefill costs a memcpy into the segment, not gigabytes of messages.

Layout: ``keys[num_layers, num_slots, num_kv_heads, head_dim]`` (C order) in a file of a private
directory (:class:`PrivateDir`) on ``/dev/shm`` (POSIX shared memory is that tmpfs), so the segment is
reachable only by this user, and removing the directory removes every segment and socket of the server.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from .protocol import WIRE_DTYPES, as_float32

SHM_ROOT = "/dev/shm"
DIR_PREFIX = "icecache-"
_DIR_RE = re.compile(rf"^{DIR_PREFIX}(\d+)-")


@dataclass(frozen=True)
class KeyStoreSpec:
    """What a process needs to map the store: file path, dtype name and shape."""

    path: str
    dtype: str
    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"key store dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("num_layers", "num_slots", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_slots, self.num_kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(WIRE_DTYPES[self.dtype]).itemsize

    def to_dict(self) -> dict:
        return asdict(self)


class KeyStore:
    """A mapped key store. ``create`` makes the segment (the runtime), ``attach`` maps an existing one
    (the indexer). ``keys`` is the numpy view; bfloat16 is held as raw uint16 words."""

    def __init__(self, spec: KeyStoreSpec, mm: mmap.mmap, owner: bool):
        self.spec = spec
        self._mm = mm
        self.owner = owner
        self.keys = np.frombuffer(mm, dtype=WIRE_DTYPES[spec.dtype]).reshape(spec.shape)

    @classmethod
    def create(cls, directory: str, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
               dtype: str = "float32", name: str = "keys") -> KeyStore:
        spec = KeyStoreSpec(os.path.join(directory, f"{name}.shm"), dtype, num_layers, num_slots, num_kv_heads,
                            head_dim)
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if spec.nbytes > free:  # a sparse file would be created, then fail with SIGBUS when written
            raise ValueError(f"the key store needs {spec.nbytes / 2**30:.2f} GiB but {directory} has "
                             f"{free / 2**30:.2f} GiB free; lower the number of host slots or enlarge /dev/shm")
        fd = os.open(spec.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, spec.nbytes)
            mm = mmap.mmap(fd, spec.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(spec, mm, owner=True)

    @classmethod
    def attach(cls, spec: KeyStoreSpec, writable: bool = False) -> KeyStore:
        fd = os.open(spec.path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != spec.nbytes:
                raise ValueError(f"key store {spec.path} has {size} bytes, its spec needs {spec.nbytes}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, spec.nbytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(spec, mm, owner=False)

    @classmethod
    def scratch(cls, keys: np.ndarray, dtype: str) -> KeyStore:
        """A store over ``keys [layers, slots, H, d]`` (already in ``dtype``'s wire form) in anonymous memory,
        read-only like an attached store's view (numba compiles per array type, read-only included): the
        indexer's warmup runs real requests on it without a file."""
        spec = KeyStoreSpec("<scratch>", dtype, *(int(x) for x in keys.shape))
        mm = mmap.mmap(-1, spec.nbytes)
        store = cls(spec, mm, owner=False)
        store.keys[...] = keys
        store.keys.setflags(write=False)
        return store

    def write(self, layer: int, slots, keys) -> None:
        """Store ``keys [n, H, d]`` of ``layer`` at ``slots [n]`` (the runtime's side)."""
        self.keys[layer, np.asarray(slots)] = keys

    def read(self, layer: int, slots: np.ndarray) -> np.ndarray:
        """Keys of ``slots`` at ``layer`` as float32 ``[H, n, d]`` (the layout the index takes)."""
        rows = self.keys[layer, slots]
        return np.ascontiguousarray(as_float32(rows, self.spec.dtype).transpose(1, 0, 2))

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; the owner also removes the file unless ``unlink=False``."""
        self.keys = None
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it does
            pass
        if unlink if unlink is not None else self.owner:
            try:
                os.unlink(self.spec.path)
            except FileNotFoundError:
                pass


#: a detached watcher: removes a private directory once the process that created it is gone. SGLang ends
#: its processes with SIGKILL (no exit handler runs), so nothing inside the server could do it.
_REAPER = r"""
import os, shutil, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
if os.fork():
    os._exit(0)
def alive(p):
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % p, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
while os.path.isdir(path) and alive(pid):
    time.sleep(0.5)
shutil.rmtree(path, ignore_errors=True)
"""


def _spawn_reaper(path: str) -> None:
    """Start the watcher for ``path`` in a session of its own, outside this process's tree (a process
    group kill or a recursive kill of the server's children does not reach it); it exits as soon as the
    directory is gone, whoever removed it."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid()), path], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait()


class PrivateDir:
    """A per-server directory with mode 0700 for the sockets and segments of one server process.

    It lives on ``/dev/shm`` when that exists (else the temp dir) and is named after the creating pid. A
    detached watcher removes it once that process is gone, however it ended; :meth:`sweep_stale` removes
    what an older version or a killed watcher left behind.
    """

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls, root: str | None = None, reaper: bool = True) -> PrivateDir:
        root = root or (SHM_ROOT if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK) else None)
        sweep_stale(root)
        path = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=root)  # mode 0700
        os.chmod(path, 0o700)
        if reaper:
            _spawn_reaper(path)
        return cls(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def endpoint(self, name: str) -> str:
        return "ipc://" + self.file(name)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: str | None = None) -> list[str]:
    """Remove our private directories whose creating process is gone; returns what was removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        m = _DIR_RE.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
            continue
        if not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
