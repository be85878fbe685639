"""`llmp bench serve`: serving throughput and latency, each system measured in the same run.

Systems, all on the same requests (tiny-l by default, prompts and output lengths that vary, greedy):
  engine   the vLLM engine called in-process (the ceiling)
  platform the platform over HTTP (Ray Serve ingress → model deployment → vLLM)
  naive    transformers + PEFT serving one request at a time (the baseline)
  vllm-serve  vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``, LoRA enabled,
              the same engine settings): what users would run instead of the platform
and the platform with one LoRA adapter, and with 8 mixed into one stream, versus the base model only
(vLLM's server too, with the same 8 adapters).

    llmp bench serve [--clients 1 8 32] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llm_platform.data.loader import synthetic_split
from llm_platform.data.templates import sentiment_pair, summary_pair
from llm_platform.engine import EngineConfig, SamplingParams, build_engine
from llm_platform.models.tiny import build_tiny_models


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int
    model_suffix: str = ""


@dataclass
class Run:
    system: str
    clients: int
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]

    def row(self) -> dict:
        ordered = sorted(self.latencies)
        return {"system": self.system, "clients": self.clients, "requests": self.requests,
                "tokens_per_s": self.tokens / self.seconds, "requests_per_s": self.requests / self.seconds,
                "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def workload(n: int, seed: int = 0, adapters: int = 0) -> list[Job]:
    """Prompts from two tasks with different lengths; output lengths drawn from 16..128."""
    rng = random.Random(seed)
    reviews, dialogues = synthetic_split("sentiment", "test"), synthetic_split("dialogsum", "test")
    jobs = []
    for i in range(n):
        pair = sentiment_pair(rng.choice(reviews), rng=rng) if i % 2 else summary_pair(rng.choice(dialogues), rng=rng)
        suffix = f":bench-{i % adapters}" if adapters else ""
        jobs.append(Job(pair.prompt, rng.randint(16, 128), suffix))
    return jobs


async def drive(system: str, clients: int, jobs: list[Job], call) -> Run:
    """Send ``jobs`` with ``clients`` concurrent callers; ``call(job)`` returns the tokens generated."""
    queue = list(reversed(jobs))
    latencies: list[float] = []
    tokens = 0

    async def client():
        nonlocal tokens
        while queue:
            job = queue.pop()
            start = time.perf_counter()
            produced = await call(job)  # not `tokens += await ...`: that reads tokens before awaiting
            tokens += produced
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Run(system, clients, len(jobs), time.perf_counter() - start, tokens, latencies)


async def bench_engine(kind: str, model: str, clients: list[int], requests_for) -> list[Run]:
    engine = build_engine(EngineConfig(model=model, kind=kind, max_model_len=1024))
    name = "engine" if kind == "vllm" else "naive"

    async def call(job: Job) -> int:
        params = SamplingParams(temperature=0, max_tokens=job.max_tokens)
        return (await engine.generate(job.prompt, params)).completion_tokens

    try:
        await drive(name, 2, workload(4, seed=99), call)  # warm-up
        runs = []
        for c in clients:
            runs.append(await drive(name, c, workload(requests_for(name, c), seed=c), call))
            print(f"  {name:9s} clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        return runs
    finally:
        engine.shutdown()


def platform_model(job: Job) -> str:
    return "tiny-l" + job.model_suffix  # the platform's ids: tiny-l, tiny-l:bench-3


def vllm_model(job: Job) -> str:
    return job.model_suffix[1:] or "tiny-l"  # vLLM's server names LoRA modules on their own: bench-3


async def bench_http(url: str, headers: dict, clients: list[int], requests_for, mixed: int,
                     name: str = "platform", model=platform_model, single: bool = True,
                     stream: bool = False) -> list[Run]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=256)) as http:
        async def call(job: Job) -> int:
            body = {"model": model(job), "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0}
            if not stream:
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]
            # As vLLM's benchmark client streams: server-sent events, the usage in the last one.
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            produced = None
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(f"{name}: error mid-stream: {event['error']}")
                        produced = (event.get("usage") or {}).get("completion_tokens", produced)
            if produced is None:
                raise RuntimeError(f"{name}: the stream ended without usage")
            return produced

        await drive(name, 2, workload(4, seed=99), call)
        await drive(name, 8, workload(16, seed=98, adapters=mixed), call)  # loads every adapter once
        runs = []
        for c in clients:
            runs.append(await drive(name, c, workload(requests_for("platform", c), seed=c), call))
            print(f"  {name:9s} clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        c = max(clients)
        if single:
            one = [Job(j.prompt, j.max_tokens, ":bench-0") for j in workload(requests_for("platform", c), seed=c)]
            runs.append(await drive(f"{name}+1lora", c, one, call))
            print(f"  {name}+1 LoRA  clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        runs.append(await drive(f"{name}+{mixed}lora", c, workload(requests_for("platform", c), seed=c,
                                                                    adapters=mixed), call))
        print(f"  {name}+{mixed} LoRAs clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        return runs


def bench_vllm_server(base: str, adapters: list[Path], clients: list[int], requests_for, work: Path,
                      stream: bool = False) -> list[Run]:
    """vLLM's own OpenAI server on the same model, engine settings and adapters, driven by the same client."""
    import os
    import signal
    import subprocess
    import sys

    from llm_platform.serving.process import free_port, wait_healthy

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
               "--served-model-name", "tiny-l", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "1024", "--max-num-seqs", "64", "--seed", "0", "--enable-lora",
               "--max-loras", str(len(adapters)), "--max-cpu-loras", str(2 * len(adapters)), "--max-lora-rank", "64",
               "--disable-log-stats", "--lora-modules", *[f"bench-{i}={path}" for i, path in enumerate(adapters)]]
    log = work / "vllm-serve.log"
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        if not wait_healthy(server, f"http://127.0.0.1:{port}/health", 600, log):
            raise TimeoutError(f"vLLM's server was not healthy after 600 s; see {log}")
        return asyncio.run(bench_http(f"http://127.0.0.1:{port}", {}, [max(clients)], requests_for, len(adapters),
                                      name="vllm-serve", model=vllm_model, single=False,
                                      stream=stream))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def make_adapters(base: Path, out: Path, count: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(out / f"lora-{i}")
        paths.append(out / f"lora-{i}")
    return paths


def run(models_dir: str, clients: list[int], workdir: str | None = None, stream: bool = False) -> dict:
    """``stream``: the HTTP clients stream (server-sent events, as vLLM's benchmark client) instead of
    waiting for whole responses."""
    from llm_platform.serving.process import ServerProcess

    models = build_tiny_models(models_dir)
    base = str(models["tiny-l"].resolve())
    work = Path(workdir or tempfile.mkdtemp(prefix="llmp-bench-serve-"))

    def requests_for(system: str, c: int) -> int:
        # The naive server handles one request at a time, so more requests only take longer.
        return 12 if system == "naive" else max(16, 2 * c)

    mixed = 8
    print("[1/4] naive baseline: transformers + PEFT, one request at a time", flush=True)
    runs = asyncio.run(bench_engine("transformers", base, clients, requests_for))
    print("[2/4] vLLM engine in-process", flush=True)
    runs += asyncio.run(bench_engine("vllm", base, clients, requests_for))
    print("[3/4] the platform over HTTP (Ray Serve)", flush=True)
    server = ServerProcess({
        "adapter_store": str(work / "store"), "allow_unauthenticated_admin": True,
        "adapter_sources": [str((work / "adapters").resolve())],
        "models": [{"id": "tiny-l", "num_cpus": 1, "max_adapters": mixed, "max_ongoing_requests": 256,
                    "engine": {"model": base, "kind": "vllm", "max_model_len": 1024, "max_loras": mixed,
                               "max_cpu_loras": 2 * mixed, "max_lora_rank": 64}}]}, work)  # as vLLM's server
    server.start()
    adapters = make_adapters(Path(base), work / "adapters", mixed)
    try:
        for i, path in enumerate(adapters):
            httpx.post(f"{server.url}/v1/adapters", timeout=60, json={
                "name": f"bench-{i}", "base": "tiny-l", "kind": "lora", "source": str(path)}).raise_for_status()
        runs += asyncio.run(bench_http(server.url, {}, clients, requests_for, mixed, stream=stream))
    finally:
        server.stop()
    print("[4/4] vLLM's own OpenAI server (what users would run instead)", flush=True)
    runs += bench_vllm_server(base, adapters, clients, requests_for, work, stream=stream)
    return {**summarize(runs, max(clients), mixed), "stream": stream}


def summarize(runs: list[Run], top: int, mixed: int) -> dict:
    rows = [r.row() for r in runs]
    at = {(r["system"], r["clients"]): r for r in rows}

    def ratio(a: str, b: str) -> float:
        return at[(a, top)]["tokens_per_s"] / at[(b, top)]["tokens_per_s"]

    return {
        "rows": rows,
        "platform_vs_engine": ratio("platform", "engine"),
        "single_adapter_vs_base": ratio("platform+1lora", "platform"),
        "mixed_adapters_vs_base": ratio(f"platform+{mixed}lora", "platform"),
        "platform_vs_naive": ratio("platform", "naive"),
        "platform_vs_vllm_serve": ratio("platform", "vllm-serve"),
        "platform_vs_vllm_serve_mixed_adapters": ratio(f"platform+{mixed}lora", f"vllm-serve+{mixed}lora"),
        "latency_s": {f"{r['system']}@{r['clients']}": {"p50": r["p50_s"], "p99": r["p99_s"]} for r in rows},
        "clients": top,
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["system"] == system]
        xs = [r["clients"] for r in rows]
        marker = "o-" if len(rows) > 1 else "s"
        ax_tput.plot(xs, [r["tokens_per_s"] for r in rows], marker, label=system)
        ax_lat.plot(xs, [r["p50_s"] for r in rows], marker, label=f"{system} p50")
    for ax, label in ((ax_tput, "generated tokens / s"), (ax_lat, "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Serving tiny-l: platform/engine {summary['platform_vs_engine']:.2f}, "
                 f"platform/naive {summary['platform_vs_naive']:.2f}, "
                 f"mixed LoRAs/base {summary['mixed_adapters_vs_base']:.2f} (at {summary['clients']} clients)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
