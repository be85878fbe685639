"""Quiet by default: stderr of the process and its children goes to the log file, stdout and errors stay on
the console; workers' progress lines reach the driver once through the relay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_platform import console
from llm_platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, subprocess, sys, warnings
from llm_platform import console
console.setup(sys.argv[1])
print("platform progress", flush=True)
os.write(2, b"raw stderr of this process\n")
subprocess.run(["sh", "-c", "echo stderr of a child process >&2"])
warnings.warn("a library warning")
console.error("llmp: error: something the user must see")
raise RuntimeError("boom")
"""


def test_quiet_setup_sends_stderr_to_the_log_and_keeps_the_console_short(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(console.LEVEL_ENV, None)
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "logs")], env=env, capture_output=True,
                         text=True, timeout=60)
    log = (tmp_path / "logs" / "llmp.log").read_text()
    assert run.stdout == "platform progress\n"
    assert run.stderr.splitlines() == ["llmp: error: something the user must see",
                                       f"error: RuntimeError: boom (traceback in {tmp_path / 'logs' / 'llmp.log'})"]
    for text in ("raw stderr of this process", "stderr of a child process", "a library warning",
                 "llmp: error: something the user must see", "Traceback", "RuntimeError: boom"):
        assert text in log, text
    assert run.returncode == 1


def test_verbose_leaves_stderr_on_the_console(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), console.LEVEL_ENV: "WARNING"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "logs")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert "stderr of a child process" in run.stderr and "Traceback" in run.stderr
    assert not (tmp_path / "logs" / "llmp.log").exists()


def test_log_level_is_checked(monkeypatch):
    monkeypatch.setenv(console.LEVEL_ENV, "loud")
    with pytest.raises(ConfigError, match="LLMP_LOG_LEVEL='loud': expected one of DEBUG, INFO, WARNING, ERROR"):
        console.level()
    monkeypatch.setenv(console.LEVEL_ENV, "info")
    assert console.level() == "INFO" and console.library_env()["VLLM_LOGGING_LEVEL"] == "INFO"
    monkeypatch.delenv(console.LEVEL_ENV)
    assert console.quiet() and console.library_env()["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"


@pytest.mark.slow
def test_worker_progress_reaches_the_driver_once(ray_local, capsys):
    import ray

    @ray.remote(num_cpus=0)
    def work(n: int) -> int:
        for i in range(n):
            console.progress(f"worker line {i} from pid {os.getpid()}")
        return os.getpid()

    pid = ray.get(work.remote(3))
    console.flush_progress()
    out = capsys.readouterr().out
    assert pid != os.getpid()
    assert [out.count(f"worker line {i} from pid {pid}\n") for i in range(3)] == [1, 1, 1], out
