"""A real two-node Ray cluster on one machine, shaped like a cluster of separate machines.

- The **head** (``ray start --head --block``, ``--num-cpus=0``) does no work: tasks, actors, train
  workers and serve replicas that need a CPU land on the worker node.
- The **worker node** (``ray start --address ... --block``) runs in its own mount namespace
  (``unshare --mount --propagation private``) with private tmpfs mounts over its temp folder and over
  :attr:`TwoNodeCluster.outputs`, the folder tests write outputs under. A file a process on the
  worker node writes there is invisible on the head and in the test process, as on another
  machine; the code, the venv and the models stay visible (nothing is mounted over them).
- Each node has its own temp dir, every port explicit, and the cluster its own auth token
  (``RAY_AUTH_MODE=token``). Each node runs in its own process group and is stopped by its PID:
  never ``ray stop``, which would end every Ray process on the machine.

Drivers run as subprocesses (:meth:`TwoNodeCluster.python`), with :attr:`TwoNodeCluster.env`:
``RAY_ADDRESS`` and the token, so the test process itself never joins the cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_platform.cluster import API_SERVER_ENV, free_port

BIN = Path(sys.executable).parent
WORKER_RESOURCE = "worker_node"
"""A custom resource only the worker node has (1 unit): pins work there, or proves where it ran."""


class TwoNodeCluster:
    def __init__(self, workdir: Path, worker_cpus: int = 2, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.worker_cpus = worker_cpus
        # Short paths: Ray's session sockets live under its temp dir, and AF_UNIX paths stop at 107 bytes.
        self.head_temp = Path(tempfile.mkdtemp(prefix="llmp-rh-", dir="/tmp"))
        self.worker_temp = Path(tempfile.mkdtemp(prefix="llmp-rw-", dir="/tmp"))
        """The worker node's Ray temp dir (its session: logs, sockets), readable from outside for debugging."""
        self.worker_private = self.workdir / "worker-tmp"
        """The worker node's TMPDIR (staging folders, downloads): a private tmpfs there."""
        self.outputs = self.workdir / "outputs"
        """Shared-looking output root: the worker node sees its own, empty, private copy."""
        for folder in (self.outputs, self.worker_private):
            folder.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PATH": f"{BIN}:{os.environ['PATH']}", API_SERVER_ENV: self.dashboard,
                    "RAY_ADDRESS": self.address}
        self.nodes: dict[str, subprocess.Popen] = {}

    @staticmethod
    def _node_ports() -> list[str]:
        # Every port explicit: other clusters on this machine may hold the defaults.
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def start(self, timeout: float = 180) -> None:
        head_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        self.nodes["head"] = subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", f"--port={self.gcs_port}", "--num-cpus=0",
             f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={self.head_temp}",
             "--object-store-memory=300000000", "--disable-usage-stats", *self._node_ports()],
            env=head_env, stdout=(self.workdir / "head.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self._wait(lambda n: n >= 1, timeout, "the Ray head")
        # The worker node: a private mount namespace, tmpfs over its temp folder and the outputs.
        private = [self.worker_private, self.outputs]
        mounts = " && ".join(f"mount -t tmpfs -o size=2g llmp-private '{folder}'" for folder in private)
        ray_start = " ".join([
            f"exec '{BIN / 'ray'}' start --block --address={self.address}", f"--num-cpus={self.worker_cpus}",
            f"--resources='{{\"{WORKER_RESOURCE}\": 1}}'", f"--temp-dir='{self.worker_temp}'",
            "--object-store-memory=300000000", "--disable-usage-stats", *self._node_ports()])
        worker_env = {**head_env, "TMPDIR": str(self.worker_private)}
        self.nodes["worker"] = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {ray_start}"],
            env=worker_env, stdout=(self.workdir / "worker.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self._wait(lambda n: n >= 2, timeout, "the worker node")

    def _wait(self, ready, timeout: float, what: str) -> None:
        code = "import ray; ray.init(logging_level='ERROR'); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + timeout
        while True:
            for name, node in self.nodes.items():
                if node.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the Ray {name} node exited with {node.returncode}; see {self.workdir}")
            try:
                out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                     timeout=60)
                lines, error = [x for x in out.stdout.splitlines() if x.startswith("NODES ")], out.stderr[-2000:]
                if out.returncode == 0 and lines and ready(int(lines[-1].split()[1])):
                    return
            except subprocess.TimeoutExpired as exc:
                error = str(exc)
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{what} did not come up in {timeout}s: {error}")
            time.sleep(1)

    def python(self, code: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Run ``code`` as a driver of this cluster (a subprocess; ``ray.init()`` joins via ``RAY_ADDRESS``)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def stop(self) -> None:
        """Worker first, then head; each by its process group (SIGTERM, then SIGKILL after 10 s)."""
        for name in ("worker", "head"):
            node = self.nodes.pop(name, None)
            if node is None or node.poll() is not None:
                continue
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:  # a graceful stop takes ~30 s; these nodes are ours alone
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(30)
        for folder in (self.head_temp, self.worker_temp):
            shutil.rmtree(folder, ignore_errors=True)
