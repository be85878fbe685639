"""`llmp serve` as a child process on free local ports: for benchmarks, the demo and tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml


def child_group(same_session: bool) -> dict:
    """``subprocess.Popen`` arguments for a child whose process tree is stopped as one (``os.killpg``): a session
    of its own, or with ``same_session`` a process group of its own in the caller's session.

    Where the kernel groups processes by session for scheduling (``/proc/sys/kernel/sched_autogroup_enabled``,
    on by default in most distributions), a server in a session of its own is scheduled as one group against the
    caller's, and on a CPU node vLLM's workers, which poll while they generate, then starve a client in the
    caller's session. On this 2-core VM (Linux 6.18), while tiny-m generated, a process of another session that
    slept 5 ms woke 0.55-1.4 s later or not within 6 s, and a streamed answer's 200 events reached the client in
    one read at the end although the server sent them every 50 ms; in the caller's session, at most 0.11 s, and
    the events arrive as sent (README, Serving). ``same_session`` is for callers that time the server from the
    same machine: the bench, the tests' shared server and the fault tests' server (whose every 503 must come
    within 10 s: in CI, with the server in a session of its own, one of 2034 came after 19 s). The two-node test
    cluster, SeaweedFS and the Tune test's driver keep sessions of their own, the arrangement their tests were
    proven with: in the one full run where every server and test cluster shared the caller's session, a killed
    Ray actor of the test cluster went unnoticed for a minute, and so did the fault server's killed engine core
    (not explained; that test has since passed a full run and a module run with only the fault server moved)."""
    if not same_session:
        return {"start_new_session": True}
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(process: subprocess.Popen, health_url: str, timeout: float, log: Path) -> bool:
    """Poll ``health_url`` until it answers 200 (True) or ``timeout`` passes (False), asking at least once;
    raise if the server process exits first (its output is in ``log``)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


class ServerProcess:
    def __init__(self, config: dict, workdir: Path, env: dict | None = None, same_session: bool = False):
        """``same_session``: see :func:`child_group`."""
        self.workdir = Path(workdir)
        self.same_session = same_session
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = self.workdir / "server.log"
        self.env = env or {}
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._offset, self._spawned = 0, 0.0  # set by spawn(): where its log starts, and when

    def start(self, timeout: float = 400) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the server process and return at once; :meth:`wait_ready` waits until it serves."""
        llmp = str(Path(sys.executable).with_name("llmp"))
        self._offset = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the same log
        self.process = subprocess.Popen(
            [llmp, "serve", "--config", str(self.config_path), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            **child_group(self.same_session))
        self._spawned = time.monotonic()

    def wait_ready(self, timeout: float = 400) -> None:
        """Wait until the spawned server serves, at most ``timeout`` seconds from its spawn (a server that has
        been up for longer is asked once); stop it if it does not serve."""
        left = timeout - (time.monotonic() - self._spawned)
        if not wait_healthy(self.process, f"{self.url}/healthz", left, self.log):
            self.stop()
            raise TimeoutError(f"server not healthy after {timeout}s; see {self.log}")
        # Healthy once the engines are up; the launcher then finishes its own set-up (moving its cluster's
        # processes off vLLM's cores) and says so.
        while b"serving on http" not in self.log.read_bytes()[self._offset:]:
            if self.process.poll() is not None or time.monotonic() - self._spawned > timeout:
                self.stop()
                raise TimeoutError(f"server healthy but not serving after {timeout}s; see {self.log}")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, as a process manager would; the server shuts down Serve and Ray and exits 0."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
