"""DPO on Ray Train: a LoRA adapter learns the preference pairs directly, without a reward model or RL.

Direct Preference Optimization raises the policy's log-probability of the chosen reply over the
rejected one, relative to a reference policy, with loss ``-log sigmoid(beta * (dc - dr))`` where
``d = log pi(reply) - log ref(reply)``. TRL's DPOTrainer runs in each Ray Train worker (DDP with
several workers); the policy is a LoRA on ``model`` and the reference is the same model with the
adapter off, so no second copy is held.

Reported on held-out pairs (summary.json): the policy's chosen-over-rejected log-probability margin
before and after training, the implicit reward margin ``beta * (dc - dr)`` against the reference,
and ``eval_accuracy``, the share of pairs where that margin is positive. Outputs in ``output_dir``:
metrics.jsonl, summary.json, adapter/ (PEFT LoRA, servable with ``POST /v1/adapters``).

Locally (starts a Ray cluster on this machine):
    python -m train_jobs.dpo --config train_jobs/configs/local_dpo.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.dpo --config train_jobs/configs/gpu_dpo.yaml
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llm_platform.alignment.config import DPOJobConfig
from llm_platform.alignment.preference_training import check_inputs, prepare as prepare_paths
from llm_platform.training.job import Job, run


def train(cfg: DPOJobConfig, folder: Path | None) -> None:
    """What each Ray Train worker runs: DPOTrainer on a LoRA policy; then rank 0 evaluates and saves."""
    import ray.train
    import ray.train.torch
    from peft import LoraConfig, TaskType
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from llm_platform.alignment.preference_training import (losses, settings_callback, trainer_arguments,
                                                            train_in_worker)
    from llm_platform.alignment.preferences import as_conversations, load_pairs, preference_margins
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.training.devices import placement
    from llm_platform.training.outputs import write_summary

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = placement(cfg.scaling.use_gpu, cfg.dtype).check(ray.train.torch.get_device())
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, cfg.dtype, str(device), trust_remote_code=cfg.trust_remote_code)
    train, held_out = load_pairs(cfg.data, "train"), load_pairs(cfg.data, cfg.data.eval_split)
    before = preference_margins(model, tokenizer, held_out, cfg.data.max_length) if rank == 0 else None

    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with tempfile.TemporaryDirectory(prefix="llmp-dpo-") as scratch:
        args = DPOConfig(**trainer_arguments(cfg.optim, cfg.scaling, cfg.dtype, scratch, cfg.gradient_checkpointing),
                         beta=cfg.beta, max_length=cfg.data.max_length)
        trainer = DPOTrainer(model=model, args=args, train_dataset=as_conversations(train),
                             eval_dataset=as_conversations(held_out) if cfg.optim.eval_every else None,
                             processing_class=tokenizer, peft_config=lora,
                             callbacks=[settings_callback(cfg.training_settings()), RayTrainReportCallback()])
        log, train_seconds = train_in_worker(trainer, folder, rank == 0, cfg, "dpo")
    if rank != 0:
        return

    policy = trainer.model
    after = preference_margins(policy, tokenizer, held_out, cfg.data.max_length)
    with policy.disable_adapter():
        reference = preference_margins(policy, tokenizer, held_out, cfg.data.max_length)
    policy.save_pretrained(folder / "adapter")
    implicit = cfg.beta * (after - reference)  # DPO's implicit reward of chosen minus rejected
    first_loss, last_loss = losses(log)
    write_summary(folder, {
        "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world, "beta": cfg.beta,
        "margin_before": float(before.mean()), "margin_after": float(after.mean()),
        "margin_reference": float(reference.mean()), "implicit_reward_margin": float(implicit.mean()),
        "eval_accuracy": float((implicit > 0).float().mean()), "eval_examples": len(held_out),
        "train_loss_first": first_loss, "train_loss": last_loss, "train_seconds": train_seconds,
        "output": "adapter"})
    log.finish()


JOB = Job(name="dpo", config=DPOJobConfig, train=train, example_config="train_jobs/configs/local_dpo.yaml",
          prepare=prepare_paths, check_inputs=check_inputs, settings=DPOJobConfig.training_settings)


def main(cfg: DPOJobConfig) -> dict:
    return run(JOB, cfg)
