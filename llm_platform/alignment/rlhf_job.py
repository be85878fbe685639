"""RLHF with PPO on Ray: vLLM rollout actors, a reward-model actor, and Ray Train workers holding the policy.

The system, as it runs each iteration:
  1. generate  a pool of rollout actors (vLLM, or transformers) samples responses to a batch of prompts,
               returning each sampled token's log-probability;
  2. score     a reward-model actor scores prompt + response;
  3. learn     the Ray Train workers (policy = LoRA on the SFT model, plus a value head; reference =
               the same model with the adapter off) recompute log-probabilities, check them against the
               engine's (``logprob_abs_diff``: the rollout engine must be running the trained weights),
               shape rewards with a per-token KL penalty (adaptive coefficient), compute GAE advantages and
               take clipped PPO steps for a few epochs of minibatches;
  4. sync      the new adapter version is loaded into the running rollout engines (no restart).
A rollout actor that dies is replaced and its share retried; checkpoints let a stopped run resume.

    python -m train_jobs.rlhf --config train_jobs/configs/local_rlhf.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.rlhf --config train_jobs/configs/gpu_rlhf.yaml
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from llm_platform import console
from llm_platform.alignment.config import RLHFConfig
from llm_platform.engine.adapters import lora_slot_rank
from llm_platform.errors import PlatformError
from llm_platform.training.job import Job, run

# torch is imported in the functions that use it: the driver checks its config before that costs seconds.


class StaleWeightsError(PlatformError):
    """The rollout engine's log-probabilities disagree with the trainer's: it is not running the trained policy."""


def verify_sync(row: dict, tolerance: float) -> None:
    """Stop the run when the rollout engine did not sample from the weights being trained."""
    if row["logprob_abs_diff"] > tolerance:
        raise StaleWeightsError(
            f"iteration {row['iteration']}: mean |engine - trainer| log-probability of the sampled tokens is "
            f"{row['logprob_abs_diff']:.3g} > {tolerance}: the rollout engine is not sampling from the weights "
            f"being trained (stale or wrongly loaded adapter)")


def train(cfg: RLHFConfig, folder: Path | None, pool) -> None:
    """What each Ray Train worker runs; ``pool`` is the rollout pool the driver started (:func:`start_rollouts`)."""
    from llm_platform.training.distributed import ray_train_context

    run_ppo(cfg, ray_train_context(), folder, pool)


def start_rollouts(cfg: RLHFConfig):
    """The rollout pool, started by the driver before Ray Train starts the trainer: its actors' engines start
    (new processes, vLLM's imports and start-up: tens of seconds here, minutes for a large model on GPUs) while
    Ray Train starts its controller and workers and rank 0 builds the policy, instead of after. Rank 0 uses it
    (and replaces an actor that dies); the driver shuts it down when the run ends, however it ends."""
    from llm_platform.alignment.rollout import RolloutPool
    from llm_platform.engine import EngineConfig

    engine = EngineConfig(model=cfg.policy_model, kind=cfg.rollout.engine, dtype=cfg.dtype, device=rollout_device(cfg),
                          max_model_len=cfg.rollout.max_model_len, trust_remote_code=cfg.trust_remote_code,
                          enable_soft_prompts=False, max_lora_rank=lora_slot_rank(cfg.lora.r), max_loras=1,
                          max_cpu_loras=2, cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib, seed=cfg.ppo.seed)
    return RolloutPool(engine, cfg.rollout.num_workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker,
                       cfg.run_name)


def _reward_placement(cfg: RLHFConfig):
    """Where the reward actor goes. An actor that asks for no CPU and no GPU fits on every node, the head too
    (``--num-cpus=0`` keeps only resource-taking work off it), so Ray could put the reward model on a head that
    should do no work; such an actor is pinned to rank 0's node, which feeds it every batch. With resources of
    its own (a GPU on GPU clusters) Ray's scheduler places it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if cfg.reward_actor.num_cpus or cfg.reward_actor.num_gpus:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def run_ppo(cfg: RLHFConfig, ctx, folder: Path | None, pool) -> None:
    import ray
    import torch
    import torch.distributed as dist
    from llm_platform.alignment import ppo
    from llm_platform.alignment.rollout import RewardWorker
    from llm_platform.engine import SamplingParams
    from llm_platform.training.devices import placement
    from llm_platform.training.distributed import shard, unwrap
    from llm_platform.training.outputs import write_summary
    from llm_platform.training.tracking import tracker

    torch.manual_seed(cfg.ppo.seed)
    device = policy_placement(cfg).check(ctx.device)
    reward = None
    if ctx.is_main:
        # The reward actor first: it loads its model while this worker builds the policy (and the rollout
        # pool, started by the driver, its engines).
        scorer = placement(cfg.reward_actor.num_gpus > 0, cfg.reward_dtype)
        reward = ray.remote(RewardWorker).options(
            num_cpus=cfg.reward_actor.num_cpus, num_gpus=cfg.reward_actor.num_gpus,
            scheduling_strategy=_reward_placement(cfg),
        ).remote(cfg.reward_model, scorer.device_type, cfg.reward_dtype, cfg.trust_remote_code)
    model, tokenizer = build_policy(cfg, str(device))
    model = shard(model, "ddp" if ctx.world > 1 else "none", device)
    core = unwrap(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.ppo.learning_rate)
    kl_control = ppo.AdaptiveKL(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    start = _restore(ctx, core, optimizer, kl_control)

    prompts = _prompts(cfg, tokenizer)
    if ctx.is_main:
        pool.wait_ready()
        _publish_policy(core, start, pool)
    log = tracker(cfg, folder, "rlhf", resume_step=start if start else None) if ctx.is_main else None
    sampling = SamplingParams(temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                              max_tokens=cfg.sampling.max_tokens, logprobs=0, seed=None)

    for iteration in range(start, cfg.ppo.iterations):
        row = {"iteration": iteration + 1, "rollout_engine": cfg.rollout.engine}
        batch = random.Random(cfg.ppo.seed * 1000 + iteration).sample(prompts, cfg.ppo.prompts_per_iteration)
        payload = [None]
        if ctx.is_main:
            t0 = time.perf_counter()
            samples = pool.generate([ids for _, ids in batch], sampling)
            row["generate_s"] = time.perf_counter() - t0
            n_tokens = sum(len(s.response_ids) for s in samples)
            row["rollout_tokens_per_s"] = n_tokens / row["generate_s"]
            t0 = time.perf_counter()
            # The reward model scores the user's text and the reply, as it was trained (the prompt's own text,
            # carried along: no chat template is parsed back).
            texts, responses = [text for text, _ in batch], [s.response_text for s in samples]
            scores = ray.get(reward.score.remote(texts, responses))
            row["score_s"] = time.perf_counter() - t0
            if cfg.ppo.log_samples:
                _log_samples(folder, iteration + 1, texts, responses, samples, scores, cfg.ppo.log_samples)
            payload = [(samples, scores)]
        if ctx.world > 1:
            dist.broadcast_object_list(payload, src=0)
        samples, scores = payload[0]
        mine = list(range(ctx.rank, len(samples), ctx.world))
        t0 = time.perf_counter()
        stats = _learn(cfg, model, core, optimizer, kl_control, [samples[i] for i in mine],
                       torch.tensor([scores[i] for i in mine]), tokenizer.pad_token_id, ctx)
        row.update(stats, learn_s=time.perf_counter() - t0, reward_mean=float(torch.tensor(scores).mean()),
                   reward_std=float(torch.tensor(scores).std()),
                   response_length=sum(len(s.response_ids) for s in samples) / len(samples))
        kl_control.update(row["kl"], len(samples))
        row["kl_coef"] = kl_control.value
        if ctx.is_main:
            row["sync_s"] = _publish_policy(core, iteration + 1, pool)
            row["rollout_workers_replaced"] = pool.replaced
            log.write(row)
            console.progress(_progress(row, cfg.ppo.iterations))
        verify_sync(row, cfg.logprob_tolerance)
        _checkpoint(ctx, core, optimizer, kl_control, iteration + 1, row, cfg.ppo.save_every, cfg.ppo.iterations,
                    settings(cfg))

    if ctx.is_main:
        core.policy.save_pretrained(folder / "adapter")
        rows = [r for r in log.rows() if "reward_mean" in r]
        quarter = max(len(rows) // 4, 1)
        write_summary(folder, {
            "iterations": len(rows), "rollout_engine": cfg.rollout.engine,
            "reward_first_quarter": sum(r["reward_mean"] for r in rows[:quarter]) / quarter,
            "reward_last_quarter": sum(r["reward_mean"] for r in rows[-quarter:]) / quarter,
            "kl_max": max(r["kl"] for r in rows), "kl_final": rows[-1]["kl"],
            "logprob_abs_diff_max": max(r["logprob_abs_diff"] for r in rows),
            "rollout_workers_replaced": pool.replaced, "resumed_from_iteration": start or None,
            "output": "adapter"})
        log.finish()
        pool.shutdown()


def _learn(cfg, model, core, optimizer, kl_control, samples, scores, pad_id, ctx) -> dict:
    """Recompute log-probabilities, check them against the engine's, then PPO epochs over minibatches.

    Every forward runs on at most ``ppo.micro_batch_size`` sequences (each cut to its own longest
    length); a minibatch's gradients are accumulated over its micro-batches, each loss a share of the
    minibatch's token mean, so the update is the one a single pass over the minibatch would make."""
    import torch

    from llm_platform.alignment import ppo
    from llm_platform.training.distributed import all_reduce_sum, gradient_sync

    batch = ppo.Batch.build(samples, pad_id, ctx.device)
    micro = cfg.ppo.micro_batch_size
    old_logprobs, ref_logprobs, old_values, ent_sum = ppo.rollout_figures(model, core, batch, micro)
    with torch.no_grad():
        engine = torch.zeros_like(old_logprobs)
        for row, s in enumerate(samples):
            engine[row, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.engine_logprobs)] = \
                torch.tensor(s.engine_logprobs)
        diff_sum = float(((engine - old_logprobs).abs() * batch.mask).sum())
        rewards, kl = ppo.shaped_rewards(scores.to(ctx.device), old_logprobs, ref_logprobs, batch.mask,
                                         kl_control.value)
        advantages, returns = ppo.gae(rewards, old_values, batch.mask, cfg.ppo.gamma, cfg.ppo.lam)
        advantages = ppo.whiten(advantages, batch.mask)
        ent = ent_sum / max(float(batch.mask.sum()), 1.0)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    steps = 0
    size = max(cfg.ppo.minibatch_size // ctx.world, 1)
    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(epoch))
        for chunk in order.split(size):
            tokens = float(batch.mask[chunk].sum())
            parts = ppo.row_parts(chunk, micro)
            for i, rows in enumerate(parts):
                part = batch.rows(rows)
                width = part.width - 1
                with gradient_sync(model, sync=i == len(parts) - 1):
                    logits, values = model(part.input_ids, part.attention_mask)
                    losses = ppo.ppo_losses(ppo.token_logprobs(logits, part.input_ids),
                                            old_logprobs[rows, :width], advantages[rows, :width], values[:, :-1],
                                            old_values[rows, :width], returns[rows, :width], part.mask,
                                            cfg.ppo.clip, cfg.ppo.value_clip, tokens=tokens)
                    (losses["policy_loss"] + cfg.ppo.value_coef * losses["value_loss"]).backward()
                for key in totals:  # the micro-batches' shares add up to the minibatch's means
                    totals[key] += float(losses[key].detach())
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.ppo.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    sums = all_reduce_sum([diff_sum, float(batch.mask.sum()), float(kl.sum()), float(len(samples)),
                           float(ent), *totals.values(), float(steps)], ctx.device)
    diff, tokens, kl_sum, n, ent_sum, pl, vl, cf, n_steps = sums
    return {"logprob_abs_diff": diff / tokens, "kl": kl_sum / n, "entropy": ent_sum / ctx.world,
            "policy_loss": pl / n_steps, "value_loss": vl / n_steps, "clip_fraction": cf / n_steps}


def policy_placement(cfg: RLHFConfig):
    """The policy's device and dtypes: the base (and so the reference) in ``dtype``, the LoRA and the
    value head in float32."""
    from llm_platform.training.devices import placement

    return placement(cfg.scaling.use_gpu, cfg.dtype, trains="adapter")


def rollout_device(cfg: RLHFConfig) -> str:
    """The transformers rollout engine's device: ``cuda`` in an actor with a GPU (vLLM picks its own)."""
    from llm_platform.training.devices import placement

    return placement(cfg.rollout.gpus_per_worker > 0, cfg.dtype).device_type


def build_policy(cfg: RLHFConfig, device: str = "cpu"):
    """The policy each worker trains (LoRA on ``policy_model`` plus a value head; with the adapter off it
    is the reference) and its tokenizer."""
    from peft import LoraConfig, TaskType, get_peft_model

    from llm_platform.alignment import ppo
    from llm_platform.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.policy_model, trust_remote_code=cfg.trust_remote_code)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora.target_modules))
    base = load_causal_lm(cfg.policy_model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    return ppo.PolicyWithValue(get_peft_model(base, lora)), tokenizer


def _log_samples(folder: Path, iteration: int, prompts: list[str], responses: list[str], samples, scores,
                 limit: int) -> None:
    """``samples.jsonl``: what the reward model was given (prompt and response texts) and what it returned."""
    import json

    with (folder / "samples.jsonl").open("a") as f:
        for prompt, response, sample, score in list(zip(prompts, responses, samples, scores))[:limit]:
            f.write(json.dumps({"iteration": iteration, "prompt": prompt, "response": response,
                                "response_ids": list(sample.response_ids), "reward": score}) + "\n")


def _prompts(cfg: RLHFConfig, tokenizer) -> list[tuple[str, list[int]]]:
    """Each distinct prompt: its text (for the reward model) and its chat-rendered token ids (for the policy)."""
    from llm_platform.alignment.rollout import chat_prompt_ids
    from llm_platform.data.loader import load_records

    records = load_records(cfg.prompts, "train", limit=cfg.prompt_limit, columns=("prompt",))
    return [(p, chat_prompt_ids(tokenizer, p)) for p in sorted(set(records["prompt"]))]


def _publish_policy(core, version: int, pool) -> float:
    """Ship the policy adapter as version ``version`` to every rollout actor, which loads it; seconds taken."""
    from llm_platform.alignment.rollout import AdapterVersion

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmp-policy-") as tmp:
        core.policy.save_pretrained(tmp)
        pool.set_adapter(AdapterVersion.from_folder(Path(tmp), "policy", version))
    return time.perf_counter() - t0


def _checkpoint(ctx, core, optimizer, kl_control, iteration: int, row: dict, every: int, last: int,
                settings: dict) -> None:
    import torch

    from llm_platform.training.checkpoint import write_settings

    if iteration % every and iteration != last:
        ctx.report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="llmp-ppo-") as tmp:
        if ctx.is_main:
            trainable = {k: v for k, v in core.named_parameters() if v.requires_grad}
            torch.save({"model": {k: v.detach().cpu() for k, v in trainable.items()},
                        "optimizer": optimizer.state_dict(), "kl_coef": kl_control.value, "iteration": iteration},
                       Path(tmp) / "ppo.pt")
            write_settings(tmp, settings)
        ctx.report(row, tmp if ctx.is_main else None)


def _restore(ctx, core, optimizer, kl_control) -> int:
    import torch

    if not ctx.checkpoint_dir:
        return 0
    state = torch.load(Path(ctx.checkpoint_dir) / "ppo.pt", weights_only=True)
    core.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    kl_control.value = state["kl_coef"]
    console.progress(f"[rank {ctx.rank}] resumed from the checkpoint after iteration {state['iteration']}")
    return state["iteration"]


def _progress(row: dict, iterations: int) -> str:
    return (f"iteration {row['iteration']:>3}/{iterations} | reward {row['reward_mean']:+.3f} | kl {row['kl']:.3f} "
            f"(coef {row['kl_coef']:.3f}) | len {row['response_length']:.1f} | {row['rollout_engine']} "
            f"{row['rollout_tokens_per_s']:,.0f} tok/s | logprob diff {row['logprob_abs_diff']:.1e} | "
            f"gen {row['generate_s']:.1f}s score {row['score_s']:.1f}s learn {row['learn_s']:.1f}s "
            f"sync {row['sync_s']:.2f}s")


def prepare(cfg: RLHFConfig) -> RLHFConfig:
    from llm_platform.models.checkpoints import resolve_model
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.prerequisites import missing
    from llm_platform.training.outputs import absolute

    ensure_tiny_model(cfg.policy_model)
    resolve_model(cfg.policy_model, weights=False)  # there, or fetchable: the workers load the weights
    from llm_platform.models.loading import load_model_config  # transformers: after the checks that need none

    load_model_config(cfg.policy_model, trust_remote_code=cfg.trust_remote_code)  # code it ships is allowed
    if not Path(cfg.reward_model).expanduser().is_dir() and "://" not in cfg.reward_model:
        raise PlatformError(missing("reward_model", cfg.reward_model, "train one first with `python -m "
                                    "train_jobs.reward_model --config train_jobs/configs/local_reward.yaml`"))
    if "://" not in cfg.reward_model:  # a local folder: its config is read here (a URI only by the actor)
        load_model_config(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    return cfg.model_copy(update={"policy_model": absolute(cfg.policy_model),
                                  "reward_model": absolute(cfg.reward_model),
                                  "output_dir": absolute(cfg.output_dir, create=True)})


def settings(cfg: RLHFConfig) -> dict:
    """What a checkpoint depends on (not where outputs go, how many workers, or tracking)."""
    return cfg.model_dump(mode="json", exclude={"output_dir", "storage_path", "run_name", "scaling", "rollout",
                                                "reward_actor", "tracking"})


JOB = Job(name="rlhf", config=RLHFConfig, train=train, example_config="train_jobs/configs/local_rlhf.yaml",
          prepare=prepare, settings=settings, actors=start_rollouts)


def main(cfg: RLHFConfig) -> dict:
    return run(JOB, cfg)
