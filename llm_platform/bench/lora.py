"""Engine-level LoRA throughput: base vs one adapter vs 8 adapters round-robin, vLLM in-process, tiny-l.

    python -m llm_platform.bench.lora [CLIENTS=32] [REQUESTS=64] [REPEATS=3] [WORKDIR]

Runs the three modes interleaved REPEATS times on one engine and prints the best generated
tokens/s of each, and tokens per CPU-second of the engine's processes (steadier than wall time
on a machine shared with other jobs). Same workload and adapters as ``llmp bench serve``.
"""
import asyncio
import json
import os
import sys
from pathlib import Path

from llm_platform.bench.serve import drive, make_adapters, tree_cpu_s, workload
from llm_platform.engine import AdapterRef, EngineConfig, SamplingParams, build_engine
from llm_platform.models.tiny import build_tiny_models


async def main(clients: int, n: int, repeats: int, work: Path):
    models = build_tiny_models(work / "models")
    base = str(models["tiny-l"].resolve())
    paths = make_adapters(Path(base), work / "adapters", 8) if not (work / "adapters/lora-7").exists() \
        else [work / f"adapters/lora-{i}" for i in range(8)]
    refs = [AdapterRef(f"bench-{i}", "lora", str(p)) for i, p in enumerate(paths)]
    engine = build_engine(EngineConfig(model=base, kind="vllm", max_model_len=1024, max_loras=8, max_cpu_loras=16))

    def caller(mode):
        async def call(job):
            adapter = None
            if mode == "single":
                adapter = refs[0]
            elif mode == "mixed":
                adapter = refs[int(job.model_suffix.rsplit("-", 1)[1])]
            params = SamplingParams(temperature=0, max_tokens=job.max_tokens)
            return (await engine.generate(job.prompt, params, adapter)).completion_tokens
        return call

    try:
        await drive("warm", 8, workload(16, seed=98, adapters=8), caller("mixed"))
        results = {m: [] for m in ("base", "single", "mixed")}
        cpu = {m: [] for m in ("base", "single", "mixed")}
        for r in range(repeats):
            for mode in ("base", "single", "mixed"):
                c0 = tree_cpu_s(os.getpid())
                run = await drive(mode, clients, workload(n, seed=clients, adapters=8), caller(mode))
                results[mode].append(run.tokens / run.seconds)
                cpu[mode].append(run.tokens / (tree_cpu_s(os.getpid()) - c0))
                print(f"  {mode:7s} rep={r} {results[mode][-1]:8.1f} tok/s  {cpu[mode][-1]:8.1f} tok/cpu-s", flush=True)
        best = {m: max(v) for m, v in results.items()}
        bestc = {m: max(v) for m, v in cpu.items()}
        print(json.dumps({"tok_s": best, "tok_per_cpu_s": bestc,
                          "single_adapter_vs_base": best["single"] / best["base"],
                          "mixed_adapters_vs_base": best["mixed"] / best["base"],
                          "cpu_single_vs_base": bestc["single"] / bestc["base"],
                          "cpu_mixed_vs_base": bestc["mixed"] / bestc["base"]}), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:] + ["32", "64", "3", "artifacts/bench-lora"][len(sys.argv) - 1:]
    asyncio.run(main(int(args[0]), int(args[1]), int(args[2]), Path(args[3])))
