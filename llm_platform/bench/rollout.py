"""``llmp bench rollout``: the RLHF rollout phase, three ways, on the same prompts and sampling.

- ``vllm_actors``: the rollout pool of train_jobs.rlhf (vLLM in a Ray actor);
- ``vllm_engine``: the same engine called in this process (what the actor adds is Ray's overhead);
- ``transformers``: ``model.generate`` in batches, what TRL-style loops do.
Responses vary in length (each prompt has its own token budget, 16 to 128). Also timed:
syncing a new adapter version into the running actor (save + load), the per-iteration cost.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import torch

from llm_platform.cluster import connect


def workload(tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (chat prompt ids, max new tokens) pairs."""
    from llm_platform.alignment.rollout import chat_prompt_ids
    from llm_platform.data.loader import load_records

    rng = random.Random(seed)
    prompts = sorted(set(load_records("synthetic:preferences", "train")["prompt"]))
    return [(chat_prompt_ids(tokenizer, rng.choice(prompts)), rng.randint(16, 128)) for _ in range(n)]


def _params(max_tokens: int, seed: int):
    from llm_platform.engine import SamplingParams

    return SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed, logprobs=0)


def run_engine(model: str, work) -> tuple[float, int]:
    from llm_platform.engine import EngineConfig, build_engine

    async def go():
        engine = build_engine(EngineConfig(model=model, kind="vllm", max_model_len=512, enable_soft_prompts=False))
        await engine.generate(work[0][0], _params(4, 0))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(p, _params(m, i)) for i, (p, m) in enumerate(work)))
        elapsed = time.perf_counter() - start
        engine.shutdown()
        return elapsed, sum(len(r.choices[0].token_ids) for r in results)

    return asyncio.run(go())


def run_actors(model: str, work, lora_dir: Path) -> tuple[float, int, float]:
    import ray

    from llm_platform.alignment.rollout import AdapterVersion, RolloutWorker
    from llm_platform.engine import EngineConfig

    engine = EngineConfig(model=model, kind="vllm", max_model_len=512, enable_soft_prompts=False)
    actor = ray.remote(RolloutWorker).options(num_cpus=1, max_concurrency=256).remote(engine)
    ray.get(actor.start.remote())
    ray.get(actor.generate.remote([work[0][0]], _params(4, 0)))
    start = time.perf_counter()
    refs = [actor.generate.remote([p], _params(m, i)) for i, (p, m) in enumerate(work)]
    samples = [s for batch in ray.get(refs) for s in batch]
    elapsed = time.perf_counter() - start
    sync = []
    for version in range(1, 4):
        t0 = time.perf_counter()
        _save_lora(model, lora_dir / f"v{version}", seed=version)
        ray.get(actor.set_adapter.remote(AdapterVersion.from_folder(lora_dir / f"v{version}", "policy", version)))
        sync.append(time.perf_counter() - t0)
    ray.kill(actor)
    return elapsed, sum(len(s.response_ids) for s in samples), sorted(sync)[1]


def run_transformers(model: str, work, batch_size: int = 16) -> tuple[float, int]:
    from llm_platform.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model)
    tokenizer.padding_side = "left"
    lm = load_causal_lm(model)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(work), batch_size):
        chunk = work[i:i + batch_size]
        batch = tokenizer.pad({"input_ids": [p for p, _ in chunk]}, return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(**batch, do_sample=True, temperature=1.0, top_k=0,
                              max_new_tokens=max(m for _, m in chunk), pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for row, (_, budget) in zip(new, chunk):  # only the tokens this request asked for count
            ended = (row == tokenizer.eos_token_id).nonzero()
            length = int(ended[0]) + 1 if len(ended) else len(row)
            tokens += min(length, budget)
    return time.perf_counter() - start, tokens


def _save_lora(model: str, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    from llm_platform.models.loading import load_causal_lm

    torch.manual_seed(seed)
    peft = get_peft_model(load_causal_lm(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    peft.save_pretrained(out)


def run(model: str, n: int) -> dict:
    import ray

    from llm_platform.models.loading import load_tokenizer

    work = workload(load_tokenizer(model), n)
    rows = []
    print(f"transformers generate: {n} prompts", flush=True)
    seconds, tokens = run_transformers(model, work)
    rows.append({"system": "transformers", "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    print(f"vLLM engine in this process: {n} prompts", flush=True)
    seconds, tokens = run_engine(model, work)
    rows.append({"system": "vllm_engine", "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    print(f"vLLM rollout actor: {n} prompts", flush=True)
    connect(logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, tokens, sync = run_actors(model, work, Path(tmp))
    finally:
        ray.shutdown()
    rows.append({"system": "vllm_actors", "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    by = {r["system"]: r["tokens_per_s"] for r in rows}
    return {"rows": rows, "model": model, "prompts": n, "adapter_sync_s": sync,
            "vllm_vs_transformers": by["vllm_actors"] / by["transformers"],
            "actors_vs_engine": by["vllm_actors"] / by["vllm_engine"]}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["system"] for r in summary["rows"]], [r["tokens_per_s"] for r in summary["rows"]])
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"rollouts on {Path(summary['model']).name}: vLLM actors x{summary['vllm_vs_transformers']:.1f} "
                 f"vs transformers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
