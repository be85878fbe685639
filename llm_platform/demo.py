"""The platform's end-to-end run on the embedded default: `make demo` calls this.

1. builds the three tiny models, generates the course's prompts with each size
   through both engines (vLLM and transformers), checks that greedy decoding agrees
   token for token, and prints the size versus latency table;
2. runs the RLHF chain as Ray jobs on a local cluster: SFT (instruction tuning on
   unfiltered chat replies) -> reward model (Bradley-Terry) -> PPO (vLLM rollout
   actor, KL penalty against the SFT model);
3. serves the SFT model, registers the PPO adapter with the running server and asks
   both over HTTP, scoring the answers with the reward model.

    llmp demo [--quick] [--verbose] [key=value ...]

The console shows the steps, one progress line per logging interval per job, and the tables;
everything else (Ray workers, vLLM, the server) is in OUT/logs/ (see ``llm_platform.console``).
``quick=true`` (``--quick``) runs the same chain smaller: tiny-s only, fewer steps and iterations.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from llm_platform import console
from llm_platform.config import FrozenConfig
from llm_platform.data.prompts import COURSE_PROMPTS
from llm_platform.engine import Engine, EngineConfig, SamplingParams, build_engine
from llm_platform.report import format_table, write_json

# llm_platform.models.tiny (transformers: seconds of imports) is imported where it is used, so that
# `llmp demo` names a mistyped setting at once.


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
    quick: bool = False
    """The same chain, smaller (a couple of minutes): tiny-s only, 16 new tokens, fewer training steps and PPO
    iterations, one question to the server."""

    @property
    def sizes(self) -> tuple[str, ...]:
        from llm_platform.models.tiny import TINY_NAMES

        return TINY_NAMES[:1] if self.quick else TINY_NAMES

    @property
    def log_dir(self) -> Path:
        return Path(self.out) / "logs"

# Job settings on top of the local configs: fewer progress lines for the console (log_every), and the
# quick mode's smaller runs.
JOB_OVERRIDES = {
    "sft": {False: ["optim.log_every=25"],
            True: ["optim.max_steps=40", "optim.log_every=20", "optim.save_every=20", "data.eval_limit=40"]},
    "reward": {False: ["optim.log_every=10"],
               True: ["optim.max_steps=10", "optim.log_every=5", "optim.save_every=10", "data.eval_limit=50"]},
    "ppo": {False: [], True: ["ppo.iterations=3", "ppo.prompts_per_iteration=16", "ppo.save_every=3"]},
}
QUESTIONS = ("Any advice on tea?", "How can I get better at cycling?", "Can you help me with plants?")


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
    if console.log_file():
        print(f"llmp demo: logs go to {cfg.log_dir}/ (add --verbose, or set LLMP_LOG_LEVEL=INFO, to see them here)",
              flush=True)
    if cfg.quick:
        cfg = cfg.model_copy(update={"max_tokens": min(cfg.max_tokens, 16)})
    summary = asyncio.run(_run(cfg))
    if cfg.rlhf:
        summary["rlhf"] = run_rlhf(cfg)
    write_json(f"{cfg.out}/summary.json", summary)
    print(f"\nwrote {cfg.out}/summary.json; logs in {cfg.log_dir}/: " +
          ", ".join(f"{name} ({what})" for name, what in _logs(cfg)))
    return summary


def _logs(cfg: DemoConfig) -> list[tuple[str, str]]:
    """The log files the run left, with what each holds."""
    found = [("llmp.log", "this process: vLLM engines, warnings"), ("ray/", "every Ray worker and actor"),
             ("server.log", "the HTTP server")]
    return [(name, what) for name, what in found if (cfg.log_dir / name).exists()]


async def _run(cfg: DemoConfig) -> dict:
    from llm_platform.models.tiny import build_tiny_models, parameter_count

    print(f"[1/5] building tiny models in {cfg.models_dir}", flush=True)
    paths = build_tiny_models(cfg.models_dir)
    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens)
    rows, outputs = [], {}
    for size in cfg.sizes:
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
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.cluster import connect, shutdown
    from llm_platform.config import load_config
    from llm_platform.training.config import SFTConfig
    from llm_platform.alignment import reward_job as reward_model
    from llm_platform.alignment import rlhf_job as rlhf
    from llm_platform.training import sft_job as sft

    configs = Path(__file__).resolve().parents[1] / "train_jobs" / "configs"
    root = Path(cfg.out) / "rlhf"
    model = f"{cfg.models_dir}/tiny-s"
    connect()
    session = console.ray_session_dir()
    server = None
    try:
        print("[3/5] SFT: instruction tuning tiny-s on chat replies (Ray Train)", flush=True)
        sft_summary = sft.main(load_config(SFTConfig, configs / "local_sft_chat.yaml",
                                           [f"model={model}", f"output_dir={root / 'sft'}", "run_name=demo-sft",
                                            *JOB_OVERRIDES["sft"][cfg.quick]]))
        sft_model = root / "sft" / "model"
        # The server needs only the SFT model, so it starts now: its start-up (a Ray cluster, Serve, a vLLM
        # engine: half a minute, much of it one core importing) overlaps the reward model and PPO, which leave
        # this machine's second core mostly idle.
        server = demo_server(sft_model, root, root / "server")
        server.spawn()
        print("[4/5] reward model (Bradley-Terry) on the preference pairs", flush=True)
        rm_summary = reward_model.main(load_config(reward_model.RewardJobConfig, configs / "local_reward.yaml",
                                                   [f"model={sft_model}", f"output_dir={root / 'reward'}",
                                                    "run_name=demo-reward", *JOB_OVERRIDES["reward"][cfg.quick]]))
        print("[5/5] PPO with a vLLM rollout actor and a reward-model actor", flush=True)
        ppo_summary = rlhf.main(load_config(RLHFConfig, configs / "local_rlhf.yaml",
                                            [f"policy_model={sft_model}", f"reward_model={root / 'reward' / 'model'}",
                                             f"output_dir={root / 'ppo'}", "run_name=demo-ppo",
                                             *JOB_OVERRIDES["ppo"][cfg.quick]]))
    except BaseException:
        if server is not None:
            server.stop()
        raise
    finally:
        shutdown()
        if session:  # the local cluster's logs (every worker's stdout/stderr) beside this process's
            shutil.copytree(Path(session) / "logs", cfg.log_dir / "ray", dirs_exist_ok=True)
    questions = QUESTIONS[:1] if cfg.quick else QUESTIONS
    answers = serve_and_ask(server, root / "ppo" / "adapter", root / "reward" / "model", questions, cfg.log_dir)
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


def demo_server(sft_model: Path, adapters: Path, workdir: Path):
    """A local, loopback-only server of the SFT model as ``tiny-s-chat``: admin left open (logged), adapters only
    from ``adapters`` (the demo's own folder)."""
    from llm_platform.serving.process import ServerProcess

    config = {"adapter_store": str(workdir.resolve() / "store"), "allow_unauthenticated_admin": True,
              "adapter_sources": [str(adapters.resolve())], "models": [
        {"id": "tiny-s-chat", "engine": {"model": str(sft_model.resolve()), "kind": "vllm", "max_model_len": 512}}]}
    return ServerProcess(config, workdir)


def serve_and_ask(server, adapter: Path, reward: Path, questions: tuple[str, ...] = QUESTIONS,
                  log_dir: Path | None = None) -> list[dict]:
    """Once the spawned ``server`` serves, register the PPO adapter without a restart and ask both the same
    questions; the server is stopped after."""
    import httpx

    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.training.outputs import register_adapter

    print(f"serving the SFT model as tiny-s-chat on {server.url}", flush=True)
    rows = []
    try:
        server.wait_ready()
        scorer = RewardScorer(str(reward))
        card = register_adapter(server.url, "ppo", "tiny-s-chat", "lora", str(adapter.resolve()))
        print(f"registered {card['id']}", flush=True)
        for question in questions:
            for model in ("tiny-s-chat", "tiny-s-chat:ppo"):
                reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                    "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
                    "temperature": 0}).json()
                text = reply["choices"][0]["message"]["content"]
                rows.append({"model": model, "question": question, "reward": scorer.score([question], [text])[0],
                             "answer": text.replace("\n", " ")[:70]})
    finally:
        server.stop()
        if log_dir:
            shutil.copy(server.log, log_dir / "server.log")
    return rows
