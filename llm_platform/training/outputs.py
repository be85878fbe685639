"""What a job leaves behind: ``metrics.jsonl``, ``summary.json``, weights, and optionally a registration.

Jobs write into a local folder; when ``output_dir`` is an object-store URI the folder
is a staging area copied there at the end with ``pyarrow.fs``, so a job on a remote
worker node leaves its results where the user can reach them.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from llm_platform import console
from llm_platform.errors import PlatformError


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str, create: bool = False) -> str:
    """``path`` made absolute if it is (or, with ``create``, will be) a local path; URIs and hub ids as they are."""
    if is_uri(path) or not (create or Path(path).expanduser().exists()):
        return path
    return str(Path(path).expanduser().resolve())


def local_dir(output_dir: str, run_name: str) -> Path:
    """The folder a job writes into: ``output_dir`` itself, or a staging folder for a URI."""
    if is_uri(output_dir):
        folder = Path(tempfile.gettempdir()) / "llmp-staging" / run_name
    else:
        folder = Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish(folder: Path, output_dir: str) -> None:
    """Copy the staged results to ``output_dir`` when it is a URI (a local output_dir is the folder)."""
    if not is_uri(output_dir):
        return
    import pyarrow.fs as pafs

    target, path = pafs.FileSystem.from_uri(output_dir)
    target.create_dir(path, recursive=True)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target)


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
