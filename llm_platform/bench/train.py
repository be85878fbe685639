"""``llmp bench train``: what Ray Train costs, and what a second worker buys.

The same SFT steps (same config, data order and seed) run three ways in one go:
``plain`` (the training loop called in this process, no Ray), ``ray_1`` (one Ray Train
worker given the same cores) and ``ray_2`` (two workers, one core each, FSDP-sharded).
Step time is measured inside the loop; wall time includes start-up (cluster, workers,
model load, evaluation). ``ray_overhead`` = ray_1 step time / plain step time (goal <= 1.15).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from llm_platform.cluster import connect
from llm_platform.config import load_config
from llm_platform.training.config import SFTConfig
from llm_platform.training.distributed import WorkerContext

CONFIG = Path(__file__).resolve().parents[2] / "train_jobs" / "configs" / "local_lora.yaml"


def run(model: str, steps: int, config: str | Path = CONFIG) -> dict:
    import ray
    import torch

    from llm_platform.training.loop import train_sft
    from llm_platform.training import sft_job as sft

    cores = os.cpu_count() or 1
    base = [f"model={model}", f"optim.max_steps={steps}", "optim.save_every=0", "data.eval_limit=32",
            f"optim.log_every={max(steps // 5, 1)}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmp-bench-train-") as tmp:
        cfg = sft.prepare(load_config(SFTConfig, config, base + [f"output_dir={tmp}/plain"]))
        Path(cfg.output_dir).mkdir(parents=True)
        torch.set_num_threads(cores)
        print(f"plain: {steps} steps in this process ({cores} threads)", flush=True)
        start = time.perf_counter()
        summary = train_sft(cfg, WorkerContext(), Path(cfg.output_dir))
        rows.append(_row("plain", summary, time.perf_counter() - start))
        connect(num_cpus=cores, logging_level="ERROR")
        try:
            for name, workers, cpus in (("ray_1", 1, cores), ("ray_2", 2, max(cores // 2, 1))):
                print(f"{name}: {steps} steps on {workers} Ray Train worker(s)", flush=True)
                overrides = base + [f"output_dir={tmp}/{name}", f"run_name={name}", f"scaling.num_workers={workers}",
                                    f"scaling.cpus_per_worker={cpus}"]
                start = time.perf_counter()
                summary = sft.main(load_config(SFTConfig, config, overrides))
                rows.append(_row(name, summary, time.perf_counter() - start))
        finally:
            ray.shutdown()
    by = {r["run"]: r for r in rows}
    return {"rows": rows, "steps": steps, "model": model,
            "ray_overhead": by["ray_1"]["train_s"] / by["plain"]["train_s"],
            "ray_overhead_wall": by["ray_1"]["wall_s"] / by["plain"]["wall_s"],
            "two_vs_one_workers": by["ray_1"]["train_s"] / by["ray_2"]["train_s"]}


def _row(name: str, summary: dict, wall: float) -> dict:
    return {"run": name, "workers": summary["num_workers"], "sharding": summary["sharding"],
            "train_s": summary["train_seconds"], "steps_per_s": summary["steps_per_s"], "wall_s": wall,
            "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"]}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["run"] for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r["train_s"] for r in rows], width=0.4, label="steps")
    ax.bar([i + 0.2 for i in range(len(rows))], [r["wall_s"] for r in rows], width=0.4, label="wall (with start-up)")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("seconds")
    ax.set_title(f"{summary['steps']} SFT steps: ray overhead x{summary['ray_overhead']:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
