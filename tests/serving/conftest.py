"""A real server for the serving tests: `llmp serve` in a subprocess, on free local ports, with keys set."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ADMIN_KEY, API_KEY = "test-admin-key", "test-api-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 400) -> None:
        env = {**os.environ, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_API_KEY": API_KEY}
        llmp = str(Path(sys.executable).with_name("llmp"))
        self.process = subprocess.Popen(
            [llmp, "serve", "--config", str(self.config), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited; see {self.log}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not healthy after {timeout}s; see {self.log}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise

    def admin(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def user(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    config = {
        "adapter_store": str(root / "store"),
        "adapter_sync_s": 0.5,
        "models": [{"id": name, "engine": {"model": str(path), "kind": "vllm", "max_model_len": 512},
                    "num_cpus": 0.5, "max_adapters": 4} for name, path in tiny_models.items()],
    }
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    running = Server(root / "serve.yaml", root / "server.log")
    running.start()
    yield running
    running.stop()
