"""`llmp bench serve`: serving throughput and latency, each system measured in the same run.

Systems, all on the same requests (tiny-l by default, prompts and output lengths that vary, greedy):
  engine   the vLLM engine called in-process (the ceiling)
  platform the platform over HTTP (Ray Serve ingress → model deployment → vLLM)
  naive    transformers + PEFT serving one request at a time (the baseline)
  vllm-serve  vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``, LoRA enabled,
              the same engine settings): what users would run instead of the platform
and the platform with one LoRA adapter, and with 8 mixed into one stream, versus the base model only
(vLLM's server too, with the same 8 adapters). The platform and vLLM's server are compared head to head:
both up, alternating short rounds at the most clients, medians of the per-round ratios.

    llmp bench serve [--clients 1 8 32] [--rounds 3] [--stream] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import asyncio
import contextlib
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


def http_call(http: httpx.AsyncClient, name: str, model, stream: bool):
    """``call(job)`` for :func:`drive`: one completion request over ``http``; returns the tokens generated."""

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

    return call


def http_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256))


async def warm_up(name: str, call, mixed: int) -> None:
    await drive(name, 2, workload(4, seed=99), call)
    await drive(name, 8, workload(16, seed=98, adapters=mixed), call)  # loads every adapter once


async def bench_http(url: str, clients: list[int], requests_for, mixed: int, stream: bool = False) -> list[Run]:
    """The platform at each client count, then with one adapter and with ``mixed`` adapters at the most."""
    async with http_client(url) as http:
        call = http_call(http, "platform", platform_model, stream)
        await warm_up("platform", call, mixed)
        runs = []
        for c in clients:
            runs.append(await drive("platform", c, workload(requests_for("platform", c), seed=c), call))
            print(f"  platform  clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        c = max(clients)
        one = [Job(j.prompt, j.max_tokens, ":bench-0") for j in workload(requests_for("platform", c), seed=c)]
        runs.append(await drive("platform+1lora", c, one, call))
        print(f"  platform+1 LoRA  clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        runs.append(await drive(f"platform+{mixed}lora", c, workload(requests_for("platform", c), seed=c,
                                                                     adapters=mixed), call))
        print(f"  platform+{mixed} LoRAs clients={c:3d} {runs[-1].row()['tokens_per_s']:8.1f} tok/s", flush=True)
        return runs


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its children (those alive now; 0 for any that are gone)."""
    import psutil

    def used(proc) -> float:
        try:
            times = proc.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    try:
        root = psutil.Process(pid)
        return sum(used(proc) for proc in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0.0


QUIET_CORES = 0.25  # a system whose processes use fewer cores than this counts as idle


async def quiet(pids: list[int], timeout: float = 15.0) -> float:
    """Waits until the processes of ``pids`` and their children (the systems not measured next) together use
    fewer than QUIET_CORES cores over half a second, at most ``timeout``; returns the seconds waited. A system
    that has just served a load stays busy for about a second after its last answer: measured at once, the next
    system shared the machine with it (the idle vLLM server used 1.02 and 0.89 CPU s during the two platform
    runs that followed one of its own in docs/bench_serve_32_clients.json at 4f41132, 0.06-0.07 during the
    other five, and those two runs gave the lowest ratios, 0.82 and 0.80)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = sum(tree_cpu_s(pid) for pid in pids)
        await asyncio.sleep(0.5)
        if (sum(tree_cpu_s(pid) for pid in pids) - before) / 0.5 < QUIET_CORES:
            break
    return round(time.monotonic() - started, 2)


async def head_to_head(systems: dict[str, tuple[str, object, int]], clients: int, requests: int, mixed: int,
                       rounds: int, stream: bool = False) -> list[dict]:
    """The platform and vLLM's server, both running, measured in alternating short rounds (A B, then B A, ...)
    on the same requests, base, one adapter and ``mixed`` adapters (in alternating order too), so that the load
    other work puts on a shared machine falls on all alike; one phase per system minutes apart gave the same
    code 0.46-1.04, and one base phase then one adapter phase gave single_adapter_vs_base 0.74 where two more
    repeats of each (a profiler attached) ranged 382-524 tok/s (base) and 436-450 (one adapter). ``systems``: name ->
    (url, model naming, server pid). Each measurement records the CPU seconds the *idle* system's processes used
    meanwhile (the platform's Ray processes do not sleep entirely), so that bias is visible, not hidden; and
    before each, the others are let go :func:`quiet`."""
    async with contextlib.AsyncExitStack() as stack:
        calls = {}
        for name, (url, model, _) in systems.items():
            calls[name] = http_call(await stack.enter_async_context(http_client(url)), name, model, stream)
            await warm_up(name, calls[name], mixed)
        results = []
        names = list(systems)
        labels = (("", 0), ("+1lora", 1), (f"+{mixed}lora", mixed))
        for r in range(rounds):
            row = {"round": r + 1}
            for name in names if r % 2 == 0 else names[::-1]:
                for label, adapters in labels if r % 2 == 0 else labels[::-1]:
                    row[f"quiet_s_before_{name}{label}"] = await quiet([systems[o][2] for o in names if o != name])
                    others = {o: tree_cpu_s(systems[o][2]) for o in names if o != name}
                    run = await drive(name + label, clients, workload(requests, seed=1000 + r, adapters=adapters),
                                      calls[name])
                    row[name + label] = run.row()["tokens_per_s"]
                    row[f"idle_cpu_s_during_{name}{label}"] = {
                        o: round(tree_cpu_s(systems[o][2]) - before, 2) for o, before in others.items()}
                    row[f"seconds_{name}{label}"] = round(run.seconds, 2)
            shown = {k: v for k, v in row.items() if isinstance(v, float) and not k.startswith(("seconds", "quiet"))}
            print(f"  round {r + 1}: " + "  ".join(f"{k} {v:.0f}" for k, v in shown.items()), flush=True)
            results.append(row)
        return results


@contextlib.contextmanager
def vllm_server(base: str, adapters: list[Path], work: Path):
    """vLLM's own OpenAI server on the same model, engine settings and adapters: yields (url, pid)."""
    import os
    import signal
    import subprocess
    import sys

    from llm_platform.serving.process import child_group, free_port, wait_healthy

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
               "--served-model-name", "tiny-l", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "1024", "--max-num-seqs", "64", "--seed", "0", "--enable-lora",
               "--max-loras", str(len(adapters)), "--max-cpu-loras", str(2 * len(adapters)), "--max-lora-rank", "64",
               "--disable-log-stats", "--lora-modules", *[f"bench-{i}={path}" for i, path in enumerate(adapters)]]
    log = work / "vllm-serve.log"
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, **child_group(same_session=True))
    try:
        if not wait_healthy(server, f"http://127.0.0.1:{port}/health", 600, log):
            raise TimeoutError(f"vLLM's server was not healthy after 600 s; see {log}")
        yield f"http://127.0.0.1:{port}", server.pid
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


def run(models_dir: str, clients: list[int], workdir: str | None = None, stream: bool = False,
        rounds: int = 3) -> dict:
    """``stream``: the HTTP clients stream (server-sent events, as vLLM's benchmark client) instead of
    waiting for whole responses. ``rounds``: alternating platform / vLLM-server rounds (see :func:`head_to_head`)."""
    from llm_platform.serving.process import ServerProcess

    models = build_tiny_models(models_dir)
    base = str(models["tiny-l"].resolve())
    work = Path(workdir or tempfile.mkdtemp(prefix="llmp-bench-serve-"))

    def requests_for(system: str, c: int) -> int:
        # The naive server handles one request at a time, so more requests only take longer.
        return 12 if system == "naive" else max(16, 2 * c)

    mixed, top = 8, max(clients)
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
                               "max_cpu_loras": 2 * mixed, "max_lora_rank": 64}}]},
        work, same_session=True)  # engine settings as vLLM's server; the load generator's session (child_group)
    server.start()
    adapters = make_adapters(Path(base), work / "adapters", mixed)
    try:
        for i, path in enumerate(adapters):
            httpx.post(f"{server.url}/v1/adapters", timeout=60, json={
                "name": f"bench-{i}", "base": "tiny-l", "kind": "lora", "source": str(path)}).raise_for_status()
        runs += asyncio.run(bench_http(server.url, clients, requests_for, mixed, stream=stream))
        print(f"[4/4] against vLLM's own OpenAI server (what users would run instead): {rounds} alternating "
              f"rounds at {top} clients, both servers up", flush=True)
        with vllm_server(base, adapters, work) as (vllm_url, vllm_pid):
            rows = asyncio.run(head_to_head(
                {"platform": (server.url, platform_model, server.process.pid),
                 "vllm-serve": (vllm_url, vllm_model, vllm_pid)},
                top, requests_for("platform", top), mixed, rounds, stream=stream))
    finally:
        server.stop()
    return {**summarize(runs, top, mixed, rows), "stream": stream}


def summarize(runs: list[Run], top: int, mixed: int, rounds: list[dict]) -> dict:
    rows = [r.row() for r in runs]
    at = {(r["system"], r["clients"]): r for r in rows}

    def ratio(a: str, b: str) -> float:
        return at[(a, top)]["tokens_per_s"] / at[(b, top)]["tokens_per_s"]

    def per_round(a: str, b: str) -> list[float]:
        return [row[a] / row[b] for row in rounds]

    return {
        "rows": rows,
        "platform_vs_engine": ratio("platform", "engine"),
        "platform_vs_naive": ratio("platform", "naive"),
        # Medians of the alternating rounds' ratios (each round: every system and adapter mix on the same
        # requests, back to back).
        "single_adapter_vs_base": statistics.median(per_round("platform+1lora", "platform")),
        "mixed_adapters_vs_base": statistics.median(per_round(f"platform+{mixed}lora", "platform")),
        "single_adapter_vs_base_rounds": per_round("platform+1lora", "platform"),
        "mixed_adapters_vs_base_rounds": per_round(f"platform+{mixed}lora", "platform"),
        "platform_vs_vllm_serve": statistics.median(per_round("platform", "vllm-serve")),
        "platform_vs_vllm_serve_mixed_adapters": statistics.median(
            per_round(f"platform+{mixed}lora", f"vllm-serve+{mixed}lora")),
        "platform_vs_vllm_serve_rounds": per_round("platform", "vllm-serve"),
        "platform_vs_vllm_serve_mixed_adapters_rounds": per_round(f"platform+{mixed}lora", f"vllm-serve+{mixed}lora"),
        "head_to_head": rounds,
        "latency_s": {f"{r['system']}@{r['clients']}": {"p50": r["p50_s"], "p99": r["p99_s"]} for r in rows},
        "clients": top,
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_lat, ax_h2h) = plt.subplots(1, 3, figsize=(16, 4.2))
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
    rounds = summary["head_to_head"]
    xs = [row["round"] for row in rounds]
    for system, (color, marker) in (("platform", ("C0", "o")), ("vllm-serve", ("C3", "s"))):
        for label, style in (("", "-"), ("+1lora", "--"), ("+8lora", ":")):  # one colour per server
            ax_h2h.plot(xs, [row[system + label] for row in rounds], marker=marker, linestyle=style, color=color,
                        label=f"{system}{label}")
    ax_h2h.set_xlabel("round (systems alternate, both servers up)")
    ax_h2h.set_ylabel(f"generated tokens / s at {summary['clients']} clients")
    ax_h2h.set_xticks(xs)
    ax_h2h.set_ylim(bottom=0)
    ax_h2h.grid(alpha=0.3)
    ax_h2h.legend(fontsize=8)
    ax_h2h.set_title(f"platform / vLLM server: {summary['platform_vs_vllm_serve']:.2f} base, "
                     f"{summary['platform_vs_vllm_serve_mixed_adapters']:.2f} mixed (medians)", fontsize=9)
    fig.suptitle(f"Serving tiny-l: platform/engine {summary['platform_vs_engine']:.2f}, "
                 f"platform/naive {summary['platform_vs_naive']:.2f}, "
                 f"one LoRA/base {summary['single_adapter_vs_base']:.2f}, "
                 f"mixed LoRAs/base {summary['mixed_adapters_vs_base']:.2f} (at {summary['clients']} clients; medians)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
