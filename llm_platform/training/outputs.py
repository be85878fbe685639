"""What a job leaves behind (``metrics.jsonl``, ``summary.json``, weights, ``config.yaml``) and how it gets
from the node that made it to where the user finds it.

A job's ``output_dir`` is a folder or an object-store URI (``s3://``, ``gs://``). The driver (the entry
point ``ray job submit`` runs, usually on the head node) and rank 0 of the training workers (usually on
another node) see it through one :class:`JobOutputs`:

- the driver creates it, saves ``config.yaml`` there and leaves a marker file named after the run;
- rank 0 writes into a local folder: ``output_dir`` itself when it is a folder *its* node sees (the
  marker is there: the same machine, or a mount every node shares), else a staging folder unique to
  the run, uploaded with ``pyarrow.fs`` when training ends. A local ``output_dir`` that the worker's
  node does not see fails at the start, saying what to use, instead of the outputs ending on the
  worker's disk where nobody reads them;
- the driver reads ``summary.json`` back from ``output_dir`` (never from a worker's disk), writes the
  published locations into it, and registers adapters by those locations.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from llm_platform import console
from llm_platform.errors import PlatformError
from llm_platform.storage import is_uri, open_filesystem

MARKER = ".llmp-run-{}"


def absolute(path: str, create: bool = False) -> str:
    """``path`` made absolute if it is (or, with ``create``, will be) a local path; URIs and hub ids as they are."""
    if is_uri(path) or not (create or Path(path).expanduser().exists()):
        return path
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class JobOutputs:
    """One run's ``output_dir``, as the driver and the training workers see it (see the module doc)."""

    output_dir: str
    run_id: str
    """Unique per run: names the marker and the staging folder, so two runs never share one."""

    @classmethod
    def create(cls, output_dir: str) -> "JobOutputs":
        """On the driver: make ``output_dir`` and leave this run's marker in it."""
        outputs = cls(absolute(output_dir, create=True).rstrip("/"), uuid.uuid4().hex[:12])
        outputs.write_text(outputs.marker, f"driver on {socket.gethostname()}\n")
        return outputs

    @property
    def marker(self) -> str:
        return MARKER.format(self.run_id)

    def location(self, *parts: str) -> str:
        """The path or URI of something under ``output_dir``."""
        return "/".join([self.output_dir, *[p.strip("/") for p in parts if p]])

    def worker_folder(self) -> Path:
        """On rank 0: the local folder to write outputs into, before :meth:`publish`."""
        if is_uri(self.output_dir):
            folder = Path(tempfile.gettempdir()) / "llmp-staging" / self.run_id
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        folder = Path(self.output_dir)
        if not (folder / self.marker).exists():
            raise PlatformError(
                f"output_dir {self.output_dir} is a folder on the driver's node that the training worker's node "
                f"({socket.gethostname()}) does not see, so the outputs would stay on the worker's disk: on a "
                f"cluster of several machines set output_dir (and storage_path) to an s3:// or gs:// URI, or to "
                f"a folder every node mounts")
        return folder

    def publish(self, folder: Path) -> None:
        """On rank 0, at the end: upload a staging folder to ``output_dir`` (a local one is written in place)."""
        if folder == Path(self.output_dir):
            return
        fs, path = open_filesystem(self.output_dir)
        pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                        use_threads=True)
        shutil.rmtree(folder, ignore_errors=True)

    def upload(self, local: Path, name: str) -> str:
        """A local file or folder copied to ``output_dir/name``, replacing what was there; its location."""
        fs, path = open_filesystem(self.location(name))
        if local.is_dir():
            fs.delete_dir_contents(path, missing_dir_ok=True)
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return self.location(name)

    def copy_within(self, source: str, name: str) -> str:
        """``source`` (a location in the same filesystem, e.g. a trial's adapter) copied to ``output_dir/name``."""
        fs, path = open_filesystem(self.location(name))
        _, source_path = open_filesystem(source)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        pafs.copy_files(source_path, path, source_filesystem=fs, destination_filesystem=fs)
        return self.location(name)

    def read_text(self, name: str) -> str | None:
        fs, path = open_filesystem(self.location(name))
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def read_json(self, name: str) -> dict:
        text = self.read_text(name)
        if text is None:
            raise PlatformError(f"the job ended without writing {self.location(name)}")
        return json.loads(text)

    def write_text(self, name: str, text: str) -> str:
        fs, path = open_filesystem(self.location(name))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return self.location(name)

    def write_json(self, name: str, data: dict) -> str:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def finish(self) -> None:
        """On the driver, when the run ends (either way): remove the marker."""
        fs, path = open_filesystem(self.location(self.marker))
        try:
            fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def as_dict(self) -> dict:
        return asdict(self)


class MetricsLog:
    """``metrics.jsonl``: one JSON row per logged step; rows past a resumed step are dropped."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        self.path = folder / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def write_summary(folder: Path, summary: dict) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def register_adapter(url: str, name: str, base: str, kind: str, source: str, timeout: float = 120) -> dict:
    """Register ``source`` with a running server's admin API (``POST /v1/adapters``)."""
    body = json.dumps({"name": name, "base": base, "kind": kind, "source": source}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/v1/adapters", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if os.environ.get("LLMP_ADMIN_KEY"):
        request.add_header("Authorization", f"Bearer {os.environ['LLMP_ADMIN_KEY']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise PlatformError(f"registering adapter {name!r} with {url} failed: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PlatformError(f"registering adapter {name!r}: cannot reach {url}: {exc}") from None


def trainer_metrics_callback(log: MetricsLog | None):
    """A transformers TrainerCallback writing the Trainer's logs to metrics.jsonl, with a progress line."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if log is None or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
            log.write(row)
            extra = "".join(f" | {k} {row[k]:.3f}" for k in ("accuracy", "margin", "rewards/margins") if k in row)
            console.progress(f"step {state.global_step:>5}/{state.max_steps} | loss {row['loss']:.4f}{extra}")

    return MetricsCallback()
