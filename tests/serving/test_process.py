"""Spawned servers (real processes, a real HTTP endpoint). ``ServerProcess.wait_ready`` counts its timeout from
the spawn, so a caller that did other work first (the demo trains while its server starts) may arrive after it
has passed; a server that serves by then is asked once and accepted. And a server started in its caller's
session keeps its whole process tree there (``child_group``), where per-session scheduling groups cannot starve
the caller."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from llm_platform.serving.process import free_port, wait_healthy


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def alive():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_server_that_serves_is_accepted_after_the_timeout_passed(endpoint, alive, tmp_path: Path):
    assert wait_healthy(alive, f"{endpoint}/healthz", timeout=-30, log=tmp_path / "log")
    started = time.monotonic()
    assert not wait_healthy(alive, f"http://127.0.0.1:{free_port()}/healthz", timeout=0, log=tmp_path / "log")
    assert time.monotonic() - started < 5  # asked once, no waiting


def test_a_server_that_exited_is_reported(endpoint, tmp_path: Path):
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    exited.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_healthy(exited, f"{endpoint}/healthz", timeout=10, log=tmp_path / "log")


def test_a_same_session_server_keeps_its_whole_tree_in_the_callers_session(server):
    """Ray's daemons and workers, the replicas and vLLM's engine-core and worker processes (Ray gives its workers
    process groups of their own, but none starts a session)."""
    found = {}
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        try:
            found[" ".join(proc.cmdline())] = os.getsid(proc.pid)
        except (psutil.Error, ProcessLookupError):  # a Ray worker that ended meanwhile
            continue
    assert any("raylet" in name for name in found) and sum("ServeReplica" in name for name in found) >= 3
    assert set(found.values()) == {os.getsid(0)}, found
    assert os.getpgid(server.process.pid) == server.process.pid != os.getpgid(0)
