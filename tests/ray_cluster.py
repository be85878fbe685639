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

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_platform.cluster import API_SERVER_ENV
from llm_platform.serving.process import child_group
from tests.seaweedfs import _free

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
        self._taken: set[int] = set()
        self.gcs_port, self.dashboard_port = self._port(), self._port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PATH": f"{BIN}:{os.environ['PATH']}", API_SERVER_ENV: self.dashboard,
                    "RAY_ADDRESS": self.address}
        self.nodes: dict[str, subprocess.Popen] = {}

    def _port(self) -> int:
        """A free port unique in this cluster, between Ray's worker ports (10002-19999) and the kernel's
        ephemeral range (32768+), where an outgoing connection once took a port picked before the node bound it."""
        while True:
            port = random.randint(20000, 32000)
            if port not in self._taken and _free(port):
                self._taken.add(port)
                return port

    def _node_ports(self) -> list[str]:
        # Every port explicit: other clusters on this machine may hold the defaults.
        return [f"--node-manager-port={self._port()}", f"--object-manager-port={self._port()}",
                f"--dashboard-agent-listen-port={self._port()}", f"--dashboard-agent-grpc-port={self._port()}",
                f"--runtime-env-agent-port={self._port()}", f"--metrics-export-port={self._port()}"]

    def start(self, timeout: float = 240, attempts: int = 3) -> None:
        # `ray start` gives a node's raylet a fixed 30 s to register (ray/_private/node.py) and exits
        # when a loaded machine is slower: such a node is started again, up to `attempts` times.
        for attempt in range(attempts):
            if self._start_node("head", self._head, lambda n: n >= 1, timeout, last=attempt == attempts - 1):
                break
            self.gcs_port, self.dashboard_port = self._port(), self._port()
            self.address, self.dashboard = f"127.0.0.1:{self.gcs_port}", f"http://127.0.0.1:{self.dashboard_port}"
            self.env.update({"RAY_ADDRESS": self.address, API_SERVER_ENV: self.dashboard})
        for attempt in range(attempts):
            if self._start_node("worker", self._worker, lambda n: n >= 2, timeout, last=attempt == attempts - 1):
                break

    def _head(self) -> subprocess.Popen:
        head_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        return subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", f"--port={self.gcs_port}", "--num-cpus=0",
             f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={self._port()}", f"--temp-dir={self.head_temp}",
             "--object-store-memory=300000000", "--disable-usage-stats", *self._node_ports()],
            env=head_env, stdout=(self.workdir / "head.log").open("ab"), stderr=subprocess.STDOUT,
            **child_group(same_session=False))

    def _worker(self) -> subprocess.Popen:
        """The worker node: a private mount namespace, tmpfs over its TMPDIR and over the outputs."""
        private = [self.worker_private, self.outputs]
        mounts = " && ".join(f"mount -t tmpfs -o size=2g llmp-private '{folder}'" for folder in private)
        ray_start = " ".join([
            f"exec '{BIN / 'ray'}' start --block --address={self.address}", f"--num-cpus={self.worker_cpus}",
            f"--resources='{{\"{WORKER_RESOURCE}\": 1}}'", f"--temp-dir='{self.worker_temp}'",
            "--object-store-memory=300000000", "--disable-usage-stats", *self._node_ports()])
        worker_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(self.worker_private)}
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {ray_start}"],
            env=worker_env, stdout=(self.workdir / "worker.log").open("ab"), stderr=subprocess.STDOUT,
            **child_group(same_session=False))

    def _start_node(self, name: str, launch, ready, timeout: float, last: bool) -> bool:
        """Start a node and wait until the cluster counts it; False if it gave up during its start-up."""
        node = self.nodes[name] = launch()
        code = "import ray; ray.init(logging_level='ERROR'); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
        deadline, error = time.monotonic() + timeout, ""
        while True:
            if node.poll() is not None:
                _kill_group(self.nodes.pop(name))  # what it left behind (a GCS, a dashboard)
                log = (self.workdir / f"{name}.log").read_text(errors="replace")
                if "timed out during startup" in log[-3000:] and not last:
                    return False
                self.stop()
                raise RuntimeError(f"the Ray {name} node exited with {node.returncode}; see {self.workdir}")
            try:
                out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                     timeout=90)
                lines, error = [x for x in out.stdout.splitlines() if x.startswith("NODES ")], out.stderr[-2000:]
                if out.returncode == 0 and lines and ready(int(lines[-1].split()[1])):
                    return True
            except subprocess.TimeoutExpired as exc:
                error = str(exc)
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the Ray {name} node did not come up in {timeout}s: {error}")
            time.sleep(2)

    def python(self, code: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Run ``code`` as a driver of this cluster (a subprocess; ``ray.init()`` joins via ``RAY_ADDRESS``)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def actors(self, class_name: str) -> list[dict]:
        """The cluster's live actors of ``class_name``: ``{"pid", "node"}`` each (Ray's state API, from a driver)."""
        code = ("from ray.util.state import list_actors; import json; print('ACTORS', json.dumps([{'pid': a.pid, "
                f"'node': a.node_id}} for a in list_actors(filters=[('class_name', '=', '{class_name}'), "
                "('state', '=', 'ALIVE')])]))")
        out = self.python(code, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("ACTORS "))[7:])

    def worker_files(self, folder: Path | str) -> list[str]:
        """The files under ``folder`` as the worker node sees them (relative paths; [] if it has none
        there): a task pinned to the worker node walks its private disk, which this process cannot see."""
        code = f"""
import json, os, ray
ray.init(logging_level="ERROR")

@ray.remote(num_cpus=0, resources={{"{WORKER_RESOURCE}": 0.01}})
def walk(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]

print("FILES", json.dumps(ray.get(walk.remote({str(folder)!r}))))
"""
        result = self.python(code, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(next(x for x in result.stdout.splitlines() if x.startswith("FILES "))[6:])

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
                _kill_group(node)
        for folder in (self.head_temp, self.worker_temp):
            shutil.rmtree(folder, ignore_errors=True)


def _kill_group(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        node.wait(30)
    except subprocess.TimeoutExpired:
        pass
