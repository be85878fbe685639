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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(process: subprocess.Popen, health_url: str, timeout: float, log: Path) -> bool:
    """Poll ``health_url`` until it answers 200 (True) or ``timeout`` passes (False); raise if the
    server process exits first (its output is in ``log``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class ServerProcess:
    def __init__(self, config: dict, workdir: Path, env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = self.workdir / "server.log"
        self.env = env or {}
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 400) -> None:
        llmp = str(Path(sys.executable).with_name("llmp"))
        offset = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the same log
        self.process = subprocess.Popen(
            [llmp, "serve", "--config", str(self.config_path), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True)
        started = time.monotonic()
        if not wait_healthy(self.process, f"{self.url}/healthz", timeout, self.log):
            self.stop()
            raise TimeoutError(f"server not healthy after {timeout}s; see {self.log}")
        # Healthy once the engines are up; the launcher then finishes its own set-up (moving its cluster's
        # processes off vLLM's cores) and says so.
        while b"serving on http" not in self.log.read_bytes()[offset:]:
            if self.process.poll() is not None or time.monotonic() - started > timeout:
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
