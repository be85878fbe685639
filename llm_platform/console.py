"""What a user sees: quiet by default, complete on request.

By default the console shows the platform's own progress (one line per logging interval per job)
and its results; everything else (Ray's and vLLM's warnings, Ray Train's per-report lines,
progress bars, C++ warnings of subprocesses) goes to log files. ``--verbose`` or
``LLMP_LOG_LEVEL=WARNING|INFO|DEBUG`` puts the libraries' messages back on the console.

How, with the libraries' own switches where they have one:
- Ray workers' stdout/stderr reach the driver only when ``ray.init(log_to_driver=True)``, which
  quiet mode turns off; they stay in the cluster's session logs (``/tmp/ray/session_*/logs``).
  The progress lines workers print still have to reach the console, so they travel through a
  small named actor (the *relay*) that the driver drains: :func:`progress`.
- Ray Train sends every ``print`` of a worker both to stdout and, through the root logger, to
  stderr (``RAY_TRAIN_ENABLE_PRINT_PATCH``): each line twice on the console. Turned off.
- Ray Train logs ``Reporting training result N: TrainingReport(...)`` at INFO on a logger named
  after its file path (ray/train/v2/_internal/execution/context.py), so its ``LoggingConfig``
  level, which filters ``ray.train.*`` loggers only, cannot hold it back; it is worker output, so
  ``log_to_driver=False`` keeps it in the worker's log file.
- vLLM logs to stdout by default; ``VLLM_LOGGING_STREAM`` sends it to stderr, and
  ``VLLM_LOGGING_LEVEL`` follows ``LLMP_LOG_LEVEL`` when verbose.
- Whatever remains in the driver (the engine-core subprocesses' C++ warnings, tqdm bars, Python
  warnings, Ray's token-authentication notice) is written to file descriptor 2 by code we do not
  control, some of it in child processes; :func:`setup` points that descriptor at
  ``LOG_DIR/llmp.log`` (no text is filtered: stderr goes to the file, stdout stays on the console).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from llm_platform.errors import ConfigError

LEVEL_ENV = "LLMP_LOG_LEVEL"
RELAY_ENV = "LLMP_PROGRESS_RELAY"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_lock = threading.Lock()
_state: dict = {"log_file": None, "console_err": None, "relay": None, "relay_name": None, "printer": None,
                "session_dir": None}


def level() -> str | None:
    """The console level asked for with ``LLMP_LOG_LEVEL``; None means quiet (the default)."""
    value = os.environ.get(LEVEL_ENV, "").strip().upper()
    if value in ("", "QUIET"):
        return None
    if value not in LEVELS:
        raise ConfigError(f"{LEVEL_ENV}={os.environ[LEVEL_ENV]!r}: expected one of {', '.join(LEVELS)} "
                          f"(or unset/QUIET for the platform's progress only)")
    return value


def quiet() -> bool:
    return level() is None


def setup(log_dir: str | Path | None = None, verbose: bool = False) -> Path | None:
    """Configure this process (and the processes it starts) for the console level. With ``verbose``
    the level is INFO unless ``LLMP_LOG_LEVEL`` says otherwise. When quiet and ``log_dir`` is given,
    stderr goes to ``LOG_DIR/llmp.log``, which is returned."""
    if verbose and not os.environ.get(LEVEL_ENV):
        os.environ[LEVEL_ENV] = "INFO"
    lvl = level()
    for key, value in library_env().items():
        os.environ.setdefault(key, value)
    if lvl is not None or log_dir is None:
        return None
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "llmp.log"
    sys.stderr.flush()
    if _state["console_err"] is None:
        _state["console_err"] = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)  # this process's and its children's stderr: C++ warnings, tqdm, subprocesses included
    os.close(fd)
    _state["log_file"] = path
    sys.excepthook = _excepthook
    logging.captureWarnings(True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return path


def library_env() -> dict[str, str]:
    """Environment for this process, its subprocesses and Ray workers, per the console level."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else each worker print() reaches the console twice
    lvl = level()
    if lvl is None:
        env["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    else:
        env["VLLM_LOGGING_LEVEL"] = lvl
    return env


def _excepthook(kind, value, tb) -> None:
    """A crash in quiet mode: the traceback goes to the log, a line saying so to the console."""
    sys.__excepthook__(kind, value, tb)
    error(f"error: {kind.__name__}: {value} (traceback in {_state['log_file']})")


def log_file() -> Path | None:
    """Where the driver's stderr goes in quiet mode (None: on the console)."""
    return _state["log_file"]


def error(message: str) -> None:
    """A message the user must see even in quiet mode (stderr may be a log file); it goes to the log too."""
    print(message, file=sys.stderr, flush=True)
    if _state["console_err"] is not None:
        print(message, file=_state["console_err"], flush=True)


def progress(line: str) -> None:
    """One line of the platform's progress, shown once on the driver's console from any process: from a
    Ray worker it goes through the driver's relay (worker output itself stays in log files when quiet)."""
    name = os.environ.get(RELAY_ENV)
    if name:
        import ray

        if ray.is_initialized():
            try:
                relay = _state["relay"] if _state["relay_name"] == name else ray.get_actor(name)
                _state["relay"], _state["relay_name"] = relay, name
                ray.get(relay.put.remote(line))  # waited for, so the line is in the relay before the job returns
                return
            except Exception:  # relay gone (driver ended): the worker's own log keeps the line
                pass
    print(line, flush=True)


def relay_env() -> dict[str, str]:
    """The env var that tells this driver's workers its relay's name (set before ``ray.init``)."""
    return {RELAY_ENV: f"llmp-progress-{os.getpid()}-{int(time.time() * 1000)}"}


def start_relay(name: str, session_dir: str | None = None) -> None:
    """Start the progress relay (after ``ray.init``) and a thread printing what it receives."""
    import ray

    # Restarted if its process dies (Ray's memory monitor may pick it): progress lines are not worth
    # failing a job for, so a lost relay costs only the lines it held.
    relay = ray.remote(num_cpus=0)(_Relay).options(name=name, max_restarts=-1, max_task_retries=-1).remote()
    ray.get(relay.take.remote())  # started before a worker looks it up
    stop = threading.Event()
    printer = threading.Thread(target=_print_loop, args=(relay, stop), daemon=True, name="llmp-progress")
    _state.update(relay=relay, relay_name=name, printer=(printer, stop), session_dir=session_dir)
    printer.start()


def flush_progress() -> None:
    """Print what the relay holds now (called when a job returns, before the driver prints more)."""
    relay = _state["relay"]
    if relay is not None and _state["printer"] is not None:
        _drain(relay)


def stop_relay() -> None:
    """Print what is left and stop the printer thread (before ``ray.shutdown``)."""
    if _state["printer"] is None:
        return
    thread, stop = _state["printer"]
    flush_progress()
    stop.set()
    thread.join(5)
    _state.update(relay=None, relay_name=None, printer=None)


def ray_session_dir() -> str | None:
    """The local Ray cluster's session folder (its logs/ holds every worker's output)."""
    return _state["session_dir"]


class _Relay:
    """Lines from workers, kept until the driver takes them. A plain actor rather than
    ``ray.util.queue.Queue`` because workers find it by name, and the queue's actor methods are private."""

    def __init__(self):
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _drain(relay) -> None:
    import ray

    with _lock:  # one taker at a time, so lines print in the order they came
        try:
            lines = ray.get(relay.take.remote(), timeout=60)
        except Exception as exc:  # the relay is being restarted, or its cluster is going away
            print(f"(progress lines lost: {type(exc).__name__})", flush=True)
            return
        for line in lines:
            print(line, flush=True)


def _print_loop(relay, stop: threading.Event) -> None:
    import ray

    while not stop.wait(0.3):
        if not ray.is_initialized():  # shut down without stop_relay(): nothing left to relay
            return
        try:
            _drain(relay)
        except Exception:  # cluster shut down under us
            return
