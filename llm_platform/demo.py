"""The platform's end-to-end run on the embedded default: `make demo` calls this.

1. builds the three tiny models, generates the course's prompts with each size
   through both engines (vLLM and transformers), checks that greedy decoding agrees
   token for token, and prints the size versus latency table;
2. runs the RLHF chain as Ray jobs on a local cluster: SFT (instruction tuning on
   unfiltered chat replies) -> reward model (Bradley-Terry) -> PPO (vLLM rollout
   actor, KL penalty against the SFT model);
3. serves the SFT model, registers the PPO adapter with the running server and asks
   both over HTTP, scoring the answers with the reward model.

    llmp demo [--out artifacts/demo] [key=value ...]
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
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
    rlhf: bool = True
    """Run the SFT -> reward model -> PPO -> serve part."""


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
    summary = asyncio.run(_run(cfg))
    if cfg.rlhf:
        summary["rlhf"] = run_rlhf(cfg)
    write_json(f"{cfg.out}/summary.json", summary)
    print(f"\nwrote {cfg.out}/summary.json")
    return summary


async def _run(cfg: DemoConfig) -> dict:
    print(f"[1/5] building tiny models in {cfg.models_dir}", flush=True)
    paths = build_tiny_models(cfg.models_dir)
    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens)
    rows, outputs = [], {}
    for size in TINY_NAMES:
        n_params = parameter_count(paths[size])
        for kind in cfg.engines:
            print(f"[2/5] {size} ({n_params / 1e6:.1f}M parameters) on {kind}: starting engine", flush=True)
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
    return summary


def run_rlhf(cfg: DemoConfig) -> dict:
    """SFT -> reward model -> PPO as Ray jobs, then the PPO adapter served over HTTP."""
    import ray

    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.cluster import connect
    from llm_platform.config import load_config
    from llm_platform.training.config import SFTConfig
    from train_jobs import reward_model, rlhf, sft

    configs = Path(__file__).resolve().parents[1] / "train_jobs" / "configs"
    root = Path(cfg.out) / "rlhf"
    model = f"{cfg.models_dir}/tiny-s"
    connect()
    try:
        print("[3/5] SFT: instruction tuning tiny-s on chat replies (Ray Train)", flush=True)
        sft_summary = sft.main(load_config(SFTConfig, configs / "local_sft_chat.yaml",
                                           [f"model={model}", f"output_dir={root / 'sft'}", "run_name=demo-sft"]))
        sft_model = root / "sft" / "model"
        print("[4/5] reward model (Bradley-Terry) on the preference pairs", flush=True)
        rm_summary = reward_model.main(load_config(reward_model.RewardJobConfig, configs / "local_reward.yaml",
                                                   [f"model={sft_model}", f"output_dir={root / 'reward'}",
                                                    "run_name=demo-reward"]))
        print("[5/5] PPO with a vLLM rollout actor and a reward-model actor", flush=True)
        ppo_summary = rlhf.main(load_config(RLHFConfig, configs / "local_rlhf.yaml",
                                            [f"policy_model={sft_model}", f"reward_model={root / 'reward' / 'model'}",
                                             f"output_dir={root / 'ppo'}", "run_name=demo-ppo"]))
    finally:
        ray.shutdown()
    answers = serve_and_ask(sft_model, root / "ppo" / "adapter", root / "reward" / "model", root / "server")
    print("\nRLHF chain:")
    print(format_table([
        {"stage": "sft", "figure": "eval_loss", "before": sft_summary["eval_loss_before"], "after": sft_summary["eval_loss"]},
        {"stage": "reward model", "figure": "held-out pair accuracy", "before": rm_summary["eval_accuracy_before"],
         "after": rm_summary["eval_accuracy"]},
        {"stage": "ppo", "figure": "mean reward (first/last quarter)", "before": ppo_summary["reward_first_quarter"],
         "after": ppo_summary["reward_last_quarter"]}]))
    print("\nServed over HTTP (greedy), scored by the reward model:")
    print(format_table(answers))
    return {"sft": sft_summary, "reward_model": rm_summary, "ppo": ppo_summary, "answers": answers}


def serve_and_ask(sft_model: Path, adapter: Path, reward: Path, workdir: Path) -> list[dict]:
    """Serve the SFT model, register the PPO adapter without a restart, ask both the same questions."""
    import httpx

    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.serving.process import ServerProcess
    from llm_platform.training.outputs import register_adapter

    # A local, loopback-only server: admin left open (logged), adapters only from the demo's own folder.
    config = {"adapter_store": str(workdir.resolve() / "store"), "allow_unauthenticated_admin": True,
              "adapter_sources": [str(adapter.resolve().parents[1])], "models": [
        {"id": "tiny-s-chat", "engine": {"model": str(sft_model.resolve()), "kind": "vllm", "max_model_len": 512}}]}
    server = ServerProcess(config, workdir)
    print(f"serving the SFT model as tiny-s-chat on {server.url}", flush=True)
    server.start()
    scorer = RewardScorer(str(reward))
    rows = []
    try:
        card = register_adapter(server.url, "ppo", "tiny-s-chat", "lora", str(adapter.resolve()))
        print(f"registered {card['id']}", flush=True)
        for question in ("Any advice on tea?", "How can I get better at cycling?", "Can you help me with plants?"):
            for model in ("tiny-s-chat", "tiny-s-chat:ppo"):
                reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                    "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
                    "temperature": 0}).json()
                text = reply["choices"][0]["message"]["content"]
                rows.append({"model": model, "question": question, "reward": scorer.score([question], [text])[0],
                             "answer": text.replace("\n", " ")[:70]})
    finally:
        server.stop()
    return rows
