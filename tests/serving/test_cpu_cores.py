"""How the serving processes tell vLLM's processes apart when vLLM could not title them (real processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from llm_platform.serving.cpu_cores import vllm_role

# A replica as Ray titles it, which spawns an "engine core" that spawns a "worker", both with multiprocessing's
# spawn and neither retitled: what vLLM's processes look like where setproctitle failed.
TREE = textwrap.dedent("""
    import multiprocessing, sys, time

    def worker():
        time.sleep(60)

    def engine(ready):
        child = multiprocessing.get_context("spawn").Process(target=worker)
        child.start()
        ready.put(child.pid)
        child.join()

    if __name__ == "__main__":
        import setproctitle
        setproctitle.setproctitle("ray::ServeReplica:app:model-x")
        context = multiprocessing.get_context("spawn")
        ready = context.Queue()
        core = context.Process(target=engine, args=(ready,))
        core.start()
        print(core.pid, ready.get(), flush=True)
        core.join()
""")


def test_untitled_engine_core_and_worker_are_known_by_the_process_tree(tmp_path: Path):
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        core, worker = (psutil.Process(int(pid)) for pid in replica.stdout.readline().split())
        assert "spawn_main" in " ".join(core.cmdline()) and "spawn_main" in " ".join(worker.cmdline())
        assert vllm_role(core) == "engine"
        assert vllm_role(worker) == "worker"
        assert vllm_role(psutil.Process(replica.pid)) is None
        assert vllm_role(psutil.Process()) is None  # a process nothing spawned
    finally:
        for proc in psutil.Process(replica.pid).children(recursive=True):
            proc.kill()
        replica.kill()
        replica.wait(10)
