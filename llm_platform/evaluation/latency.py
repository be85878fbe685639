"""`llmp eval latency`: how generation time grows with model size, on the course's three prompts.

The course sends a simple question, a multi-step reasoning task and a real-time exchange to
models of increasing size, with sampling on (temperature 0.8, repetition penalty 1.5, 256 new
tokens), and compares the time taken. Here every base model gets the same prompts with the same
seeds, through the engine in-process, or through the serving endpoint when one is configured.
Milliseconds per token is the figure to compare across sizes: sampled answers end at different
lengths, so seconds per prompt mix speed with verbosity.

    llmp eval latency --config llm_platform/evaluation/configs/latency_local.yaml [--json F] [--plot F]
    llmp eval latency --config ... endpoint=http://127.0.0.1:8000   # against `llmp serve`
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from llm_platform.config import FrozenConfig
from llm_platform.data.prompts import COURSE_PROMPTS
from llm_platform.engine import Engine, SamplingParams, build_engine
from llm_platform.evaluation import EvaluationError
from llm_platform.evaluation.models import EngineSettings, build_tiny_if_asked, count_parameters
from llm_platform.evaluation.output import progress, pyplot, save
from llm_platform.report import format_table

# Sends one prompt to one model and times the tokens as they arrive.
Call = Callable[[str, SamplingParams], Awaitable["Timing"]]


class Sampling(FrozenConfig):
    """Generation settings; the defaults are the course's."""

    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    repetition_penalty: float = Field(1.5, gt=0, le=2)
    max_tokens: int = Field(256, gt=0)
    seed: int = 0
    """Seed of the first repeat (repeat i uses seed + i), so runs repeat."""

    def params(self, repeat: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty, max_tokens=self.max_tokens,
                              seed=self.seed + repeat)


class Config(FrozenConfig):
    models: dict[str, str | None] = Field(min_length=1)
    """Base models, smallest first: name -> checkpoint folder or hub id. With an endpoint the names
    are the served model ids and the paths are only read for parameter counts (null: unknown)."""
    build_tiny_models: str | None = None
    """If set, build the tiny models into this folder first when they are missing."""
    engine: EngineSettings = EngineSettings()
    """Engine run in-process when no endpoint is given."""
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000); requests go to /v1/completions."""
    api_key_env: str = "LLMP_API_KEY"
    """Environment variable holding the endpoint's API key, sent as a bearer token when set."""
    prompts: dict[str, str] = Field(default_factory=lambda: dict(COURSE_PROMPTS), min_length=1)
    """Prompts by name."""
    sampling: Sampling = Sampling()
    repeats: int = Field(1, gt=0)
    """Generations per prompt and model (seeds seed .. seed + repeats - 1); times are averaged."""
    timeout_s: float = Field(600, gt=0)
    """Longest wait for one HTTP response."""

    @model_validator(mode="after")
    def _paths_without_endpoint(self) -> Config:
        missing = [name for name, path in self.models.items() if path is None]
        if missing and self.endpoint is None:
            raise ValueError(f"models {missing} need a path: without an endpoint they run in-process")
        return self


def run(cfg: Config) -> dict:
    return asyncio.run(evaluate(cfg))


async def evaluate(cfg: Config, engine_for: Callable[[str], Engine] | None = None) -> dict:
    """Time every prompt on every model. ``engine_for(name)`` lends engines the caller keeps;
    without it each model's engine is built here and shut down before the next one starts."""
    build_tiny_if_asked(cfg.build_tiny_models)
    params = {name: count_parameters(path) if path else None for name, path in cfg.models.items()}
    bar = progress(len(cfg.models) * len(cfg.prompts) * cfg.repeats, "latency", unit="gen")
    rows = []
    with bar:
        if cfg.endpoint:
            rows = await _through_endpoint(cfg, params, bar)
        else:
            for name, path in cfg.models.items():
                engine = engine_for(name) if engine_for else build_engine(cfg.engine.for_model(path))
                try:
                    rows += await _time_prompts(cfg, name, params[name], _engine_call(engine), bar)
                finally:
                    if engine_for is None:
                        engine.shutdown()
    source = f"endpoint {cfg.endpoint}" if cfg.endpoint else f"{cfg.engine.kind} engine"
    return {"rows": rows, "source": source, "sampling": cfg.sampling.model_dump(),
            "repeats": cfg.repeats}


@dataclass
class Timing:
    """When one generation's tokens arrived."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    """Seconds per token after the first chunk; a chunk of k tokens adds k gaps of a k-th of its wait."""

    def arrived(self, count: int) -> None:
        if count == 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps += [(now - self.last) / count] * count
        self.last, self.tokens = now, self.tokens + count


async def _time_prompts(cfg: Config, name: str, params: int | None, call: Call, bar) -> list[dict]:
    """Rows per prompt, then the model's average row (over every generation of every prompt)."""
    bar.set_postfix_str(name)
    await call("warm up", SamplingParams(temperature=0, max_tokens=4))  # one-off costs stay out of the figures
    rows, everything = [], []
    for prompt_name, prompt in cfg.prompts.items():
        timings = []
        for repeat in range(cfg.repeats):
            timings.append(await call(prompt, cfg.sampling.params(repeat)))
            bar.update()
        rows.append(_row(name, params, prompt_name, timings))
        everything += timings
    return rows + [_row(name, params, "average", everything)]


def _row(model: str, params: int | None, prompt: str, timings: list[Timing]) -> dict:
    """Means per generation; tokens/s from the totals; ms_per_token is the median time between tokens
    (the decode step), which a burst of other work on the machine barely moves."""
    seconds = sum(t.last - t.start for t in timings)
    tokens = sum(t.tokens for t in timings)
    gaps = [g for t in timings for g in t.gaps]
    return {"model": model, "params": params, "params_M": round(params / 1e6, 2) if params else None,
            "prompt": prompt, "seconds": seconds / len(timings), "tokens": tokens / len(timings),
            "tokens_per_s": tokens / seconds,
            "ttft_ms": 1000 * sum(t.first - t.start for t in timings) / len(timings),
            "ms_per_token": 1000 * (statistics.median(gaps) if gaps else seconds / tokens)}


def _engine_call(engine: Engine) -> Call:
    async def call(prompt: str, params: SamplingParams) -> Timing:
        timing = Timing()
        async for chunk in engine.stream(engine.encode(prompt), params):
            timing.arrived(len(chunk.token_ids))
        return timing

    return call


async def _through_endpoint(cfg: Config, params: dict[str, int | None], bar) -> list[dict]:
    import httpx

    key = os.environ.get(cfg.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    rows = []
    async with httpx.AsyncClient(base_url=cfg.endpoint, headers=headers, timeout=cfg.timeout_s) as http:
        for name in cfg.models:
            rows += await _time_prompts(cfg, name, params[name], _http_call(http, name), bar)
    return rows


def _http_call(http, model: str) -> Call:
    """Streams the completion; ``logprobs: 0`` makes each event list its tokens, so they can be counted."""
    import httpx

    async def call(prompt: str, params: SamplingParams) -> Timing:
        body = {"model": model, "prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k, "repetition_penalty": params.repetition_penalty,
                "seed": params.seed, "stream": True, "logprobs": 0}
        timing = Timing()
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise EvaluationError(f"endpoint {http.base_url} answered {response.status_code} for model "
                                          f"{model!r}: {(await response.aread()).decode()[:300]}")
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        timing.arrived(_event_tokens(json.loads(line.removeprefix("data: ")), http.base_url))
        except httpx.HTTPError as exc:
            raise EvaluationError(f"endpoint {http.base_url}: {type(exc).__name__}: {exc}") from None
        return timing

    return call


def _event_tokens(event: dict, url) -> int:
    if "error" in event:
        raise EvaluationError(f"endpoint {url} failed mid-stream: {event['error'].get('message')}")
    return sum(len((choice.get("logprobs") or {}).get("tokens", [])) for choice in event.get("choices", []))


def table(summary: dict) -> str:
    text = format_table(summary["rows"], ["model", "params_M", "prompt", "seconds", "tokens", "tokens_per_s",
                                          "ttft_ms", "ms_per_token"])
    averages = [r for r in summary["rows"] if r["prompt"] == "average"]
    lines = [f"Latency by model size ({summary['source']}, temperature {summary['sampling']['temperature']}, "
             f"repetition penalty {summary['sampling']['repetition_penalty']}, "
             f"up to {summary['sampling']['max_tokens']} new tokens)", text]
    if len(averages) > 1 and averages[0]["params"] and averages[-1]["params"]:
        first, last = averages[0], averages[-1]
        lines.append(f"\n{last['model']} has {last['params'] / first['params']:.0f}x the parameters of "
                     f"{first['model']} and takes {last['ms_per_token'] / first['ms_per_token']:.1f}x the time "
                     f"per token ({first['ms_per_token']:.1f} -> {last['ms_per_token']:.1f} ms)")
    lines.append("seconds, tokens: per generation; ttft: time to the first token; ms_per_token: median time "
                 "between tokens")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Latency against parameter count (log scale): per token, and per prompt, one line per prompt."""
    plt = pyplot()
    rows = [r for r in summary["rows"] if r["params"]]
    fig, (ax_token, ax_prompt) = plt.subplots(1, 2, figsize=(11, 4.2))
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        mine = sorted((r for r in rows if r["prompt"] == prompt), key=lambda r: r["params"])
        style = {"linewidth": 2.5, "color": "black"} if prompt == "average" else {"alpha": 0.8}
        xs = [r["params"] for r in mine]
        ax_token.plot(xs, [r["ms_per_token"] for r in mine], "o-", label=prompt, **style)
        ax_prompt.plot(xs, [r["seconds"] for r in mine], "o-", label=prompt, **style)
        for r in mine if prompt == "average" else []:
            ax_token.annotate(r["model"], (r["params"], r["ms_per_token"]), textcoords="offset points",
                              xytext=(4, -12), fontsize=8)
    for ax, label in ((ax_token, "ms per generated token"), (ax_prompt, "seconds per prompt")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency against model size ({summary['source']})")
    save(fig, path)
