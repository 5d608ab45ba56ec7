"""Start ``python -m sglang.launch_server`` as a child process and wait until it serves (tests, benchmarks,
examples, the main job), with the environment SGLang needs on a machine without a GPU.

    python -m icecache_sglang.launch --model-path M --enable-icecache ...   # same flags as sglang.launch_server

On a CUDA machine nothing is added; without one, ``SGLANG_USE_CPU_ENGINE=1`` and the torch_native path are
set (docs/cpu.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def server_env(base: dict | None = None, cpu: bool | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    kernels = sys.modules.get("icecache_sglang.kernels")
    if base is None and kernels is not None and kernels.INTERPRETED:
        env.pop("TRITON_INTERPRET", None)  # set for our kernels' CPU tests, not a setting of the user's
    env["PYTHONSAFEPATH"] = "1"  # the repository's kernels/ folder must not shadow PyPI's `kernels`
    if cpu if cpu is not None else not has_cuda():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is alive and not a zombie (one left unreaped where PID 1 does not
    reap, in some containers, holds no memory and must not keep a caller waiting)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    from icecache_sglang.indexer.launcher import proc_stat

    for name in names:
        fields = proc_stat(int(name)) if name.isdigit() else None
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port for a server, below the kernel's ephemeral range. The port is released before SGLang
    binds it, and SGLang's own processes take ports with ``bind(0)``, which come from the ephemeral range:
    a port from there could be handed to one of them in between (seen: the scheduler's port equal to the
    HTTP port, a server that never answered)."""
    low = _ephemeral_low()
    if low > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend_args(args: list[str]) -> list[str]:
    """torch_native on the CPU path, unless the flags pick a backend (``--enable-icecache`` picks its own)."""
    if "--enable-icecache" in args or "--attention-backend" in args:
        return []
    return ["--attention-backend", "torch_native"]


def cpu_server_args(max_total_tokens: int = 70000) -> list[str]:
    """Flags a small CPU machine needs (sglang-integration.md section 6)."""
    return ["--max-total-tokens", str(max_total_tokens), "--sleep-on-idle", "--dtype", "float32",
            "--chunked-prefill-size", "8192", "--max-prefill-tokens", "16384"]


class ServerProcess:
    """One SGLang server. ``args``: extra launch flags. Use as a context manager or call start()/stop()."""

    def __init__(self, model_path: str | Path, args: list[str] = (), port: int | None = None,
                 log_path: str | Path | None = None, cpu: bool | None = None, env: dict | None = None,
                 api_key: str | None = None):
        self.model_path = str(model_path)
        self.api_key = api_key  # sent as a bearer token by the helpers below (--api-key / --admin-api-key)
        self.cpu = (not has_cuda()) if cpu is None else cpu
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = Path(log_path) if log_path else None
        self.env = server_env(env, self.cpu)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._metrics_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR of this run, removed by stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.cpu:
            cmd += cpu_server_args() + default_backend_args(self.args)
        return cmd + self.args

    def start(self, timeout_s: float = 900.0) -> ServerProcess:
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log = out if self.log_path else None
        # SGLang keeps --enable-metrics' files in a temporary directory it removes only on a clean exit: give it
        # one of ours, which stop() removes whatever the ending
        self._metrics_dir = tempfile.mkdtemp(prefix="icecache-server-metrics-",
                                             dir=self.env.get("PROMETHEUS_MULTIPROC_DIR"))
        self.proc = subprocess.Popen(self.command(), env={**self.env, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = (f"SGLang server exited with {self.proc.returncode} during start-up"
                       + (f"; log: {self.log_path}\n{self.tail()}" if self.log_path else ""))
                self.stop()  # what it left (a scheduler, an indexer, the metrics directory)
                raise RuntimeError(why)
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not ready after {timeout_s:.0f} s")

    def tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace_s: float = 1.0, timeout_s: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after ``grace_s``; returns once no
        process of the group runs (at most ``timeout_s`` more), so its memory (a GPU's too) is free. SGLang's
        own shutdown takes 5-7 s (a drain, or the crash handler's 5 s sleep once its scheduler is gone) and
        keeps nothing this harness needs; the indexer's directory and key store are removed by their reaper
        (within about half a second of the scheduler's end), the metrics directory here."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, timeout_s)):
            try:
                os.killpg(pgid, sig)  # the whole group: a child may outlive the main process
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout_s
        while _group_running(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc = None
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ small client helpers
    def _headers(self, key: str | None) -> dict:
        key = self.api_key if key is None else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, payload: dict, timeout_s: float = 600.0, key: str | None = None) -> dict:
        """POST JSON; ``key`` overrides the server's API key ("" sends none)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json", **self._headers(key)})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = r.read()
        try:
            return json.loads(body or b"{}")
        except ValueError:
            return {"text": body.decode(errors="replace")}

    def get(self, path: str, timeout_s: float = 30.0, key: str | None = None) -> dict:
        req = urllib.request.Request(self.url + path, headers=self._headers(key))
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = r.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"text": body.decode(errors="replace")}

    def generate(self, text=None, max_new_tokens: int = 16, input_ids=None, timeout_s: float = 600.0,
                 **sampling) -> dict:
        payload = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, **sampling}}
        if input_ids is not None:
            payload["input_ids"] = input_ids
        else:
            payload["text"] = text
        return self.post("/generate", payload, timeout_s=timeout_s)

    def set_icecache(self, key: str | None = None, **settings) -> dict:
        """``POST /icecache/config``: change budget_tokens / selection / query / selection_deadline_ms on the
        running server; the next forward pass runs with them. Raises ValueError with the server's reason
        (``PermissionError`` when the key is refused)."""
        try:
            return self.post("/icecache/config", settings, timeout_s=30.0, key=key)
        except urllib.error.HTTPError as e:
            reason = json.loads(e.read() or b"{}").get("error", str(e))
            if e.code in (401, 403):
                raise PermissionError(f"{e.code}: {reason}") from None
            raise ValueError(reason) from None

    def icecache_stats(self, rank: int = 0, wait_s: float = 1.2) -> dict:
        """The rank's IceCache snapshot; waits ``wait_s`` first so it reflects what just happened."""
        time.sleep(wait_s)
        return self.get("/icecache/stats")["ranks"].get(str(rank), {})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = server_env()
    cmd = [sys.executable, "-m", "sglang.launch_server", *argv]
    if env.get("SGLANG_USE_CPU_ENGINE") == "1":
        cmd += default_backend_args(argv)
    os.execve(sys.executable, cmd, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
