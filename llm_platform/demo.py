"""The platform's end-to-end run on the embedded default: `make demo` calls this.

At this stage it builds the three tiny models, generates the course's prompts
with each size through both engines (vLLM and transformers), checks that greedy
decoding agrees token for token, and prints the size versus latency table.

    llmp demo [--out artifacts/demo] [key=value ...]
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from llm_platform.config import FrozenConfig
from llm_platform.data.prompts import COURSE_PROMPTS
from llm_platform.engine import Engine, EngineConfig, SamplingParams, build_engine
from llm_platform.models.tiny import TINY_NAMES, build_tiny_models, parameter_count
from llm_platform.report import format_table, write_json


class DemoConfig(FrozenConfig):
    models_dir: str = "artifacts/models"
    """Where the tiny models are built (kept between runs)."""
    out: str = "artifacts/demo"
    """Where the demo writes summary.json."""
    engines: tuple[Literal["vllm", "transformers"], ...] = ("vllm", "transformers")
    """Engines to compare."""
    max_tokens: int = Field(48, gt=0)
    """New tokens per prompt (greedy)."""


async def time_prompts(engine: Engine, params: SamplingParams) -> list[dict]:
    """Generate each course prompt once (after a warm-up) and time it."""
    await engine.generate("warm up", SamplingParams(temperature=0, max_tokens=4))
    rows = []
    for name, prompt in COURSE_PROMPTS.items():
        start = time.perf_counter()
        result = await engine.generate(prompt, params)
        seconds = time.perf_counter() - start
        tokens = result.completion_tokens
        rows.append({"prompt": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "token_ids": result.choices[0].token_ids})
    return rows


def run(cfg: DemoConfig) -> dict:
    return asyncio.run(_run(cfg))


async def _run(cfg: DemoConfig) -> dict:
    print(f"[1/2] building tiny models in {cfg.models_dir}", flush=True)
    paths = build_tiny_models(cfg.models_dir)
    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens)
    rows, outputs = [], {}
    for size in TINY_NAMES:
        n_params = parameter_count(paths[size])
        for kind in cfg.engines:
            print(f"[2/2] {size} ({n_params / 1e6:.1f}M parameters) on {kind}: starting engine", flush=True)
            engine = build_engine(EngineConfig(model=str(paths[size]), kind=kind))
            try:
                timed = await time_prompts(engine, params)
            finally:
                engine.shutdown()
            outputs[(size, kind)] = [r.pop("token_ids") for r in timed]
            seconds = sum(r["seconds"] for r in timed)
            tokens = sum(r["tokens"] for r in timed)
            rows.append({"model": size, "params_M": round(n_params / 1e6, 2), "engine": kind,
                         "seconds": seconds / len(timed), "tokens_per_s": tokens / seconds,
                         "ms_per_token": 1000 * seconds / tokens})
    for row in rows:
        reference = outputs.get((row["model"], cfg.engines[-1]))
        row["greedy_agrees"] = outputs[(row["model"], row["engine"])] == reference
    print("\nGreedy generation of the course prompts, average per prompt:")
    print(format_table(rows))
    summary = {"rows": rows, "models": {k: str(v) for k, v in paths.items()}}
    write_json(f"{cfg.out}/summary.json", summary)
    print(f"\nwrote {cfg.out}/summary.json")
    return summary
