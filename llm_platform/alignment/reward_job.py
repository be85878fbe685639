"""Reward model on Ray Train: the RLHF step between SFT and PPO.

A one-output sequence classifier (the base model with a fresh score head) learns from preference
pairs with the Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``: TRL's RewardTrainer in
each Ray Train worker (DDP with several workers). Each pair is a user prompt and two replies,
rendered with the chat template. Bradley-Terry fixes rewards only up to a constant, so the mean
training-set reward is stored as ``reward_offset`` in model/config.json and subtracted by
``llm_platform.alignment.reward.RewardScorer`` (what PPO's reward actor uses): rewards average 0.

Outputs in ``output_dir``: metrics.jsonl, summary.json (held-out ``eval_accuracy``: share of pairs
with reward(chosen) > reward(rejected), before and after training), model/ (+ tokenizer).

Locally (starts a Ray cluster on this machine):
    python -m train_jobs.reward_model --config train_jobs/configs/local_reward.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.reward_model --config train_jobs/configs/gpu_reward.yaml
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llm_platform.alignment.config import RewardJobConfig
from llm_platform.alignment.preference_training import check_inputs, prepare as prepare_paths
from llm_platform.training.job import Job, run


def train(cfg: RewardJobConfig, folder: Path | None) -> None:
    """What each Ray Train worker runs: RewardTrainer; then rank 0 centres, saves and evaluates."""
    import ray.train
    import ray.train.torch
    from peft import LoraConfig, TaskType
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from llm_platform.alignment.preference_training import (losses, settings_callback, trainer_arguments,
                                                            train_in_worker)
    from llm_platform.alignment.preferences import as_conversations, load_pairs
    from llm_platform.alignment.reward import OFFSET_KEY, RewardScorer, ranking
    from llm_platform.training.devices import placement
    from llm_platform.training.outputs import write_summary

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = placement(cfg.scaling.use_gpu, cfg.dtype).check(ray.train.torch.get_device())
    set_seed(cfg.optim.seed)  # the fresh score head starts the same in every run
    model, tokenizer = build_reward_model(cfg, str(device))
    train, held_out = load_pairs(cfg.data, "train"), load_pairs(cfg.data, cfg.data.eval_split)
    before = RewardScorer.from_model(model, tokenizer).pair_accuracy(held_out) if rank == 0 else None

    lora = cfg.lora and LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                   lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with tempfile.TemporaryDirectory(prefix="llmp-reward-") as scratch:
        args = RewardConfig(**trainer_arguments(cfg.optim, cfg.scaling, cfg.dtype, scratch, cfg.gradient_checkpointing),
                            max_length=cfg.data.max_length)
        trainer = RewardTrainer(model=model, args=args, train_dataset=as_conversations(train),
                                eval_dataset=as_conversations(held_out) if cfg.optim.eval_every else None,
                                processing_class=tokenizer, peft_config=lora,
                                callbacks=[settings_callback(cfg.training_settings()), RayTrainReportCallback()])
        log, train_seconds = train_in_worker(trainer, folder, rank == 0, cfg, "reward_model")
    if rank != 0:
        return

    out = folder / "model"
    trained = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    trained.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Centre on the saved model, loaded as PPO's reward actor will load it.
    scorer = RewardScorer(str(out), str(device), dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    chosen, rejected = scorer.score_pairs(train)
    offset = sum(chosen + rejected) / (2 * len(train))
    trained.config.update({OFFSET_KEY: offset})
    trained.config.save_pretrained(out)
    scorer.offset = offset
    held_chosen, held_rejected = scorer.score_pairs(held_out)
    accuracy, margin = ranking(held_chosen, held_rejected)
    first_loss, last_loss = losses(log)
    write_summary(folder, {
        "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world,
        "eval_accuracy": accuracy, "eval_accuracy_before": before[0], "eval_examples": len(held_out),
        "reward_margin": margin, "reward_margin_before": before[1], "reward_offset": offset,
        "reward_mean_train": sum(chosen + rejected) / (2 * len(train)) - offset,
        "reward_mean_eval": sum(held_chosen + held_rejected) / (2 * len(held_out)),
        "train_loss_first": first_loss, "train_loss": last_loss, "train_seconds": train_seconds,
        "output": "model"})
    log.finish()


def build_reward_model(cfg: RewardJobConfig, device: str = "cpu"):
    """The classifier the workers train (the base with a fresh one-output score head) and its tokenizer."""
    from llm_platform.models.loading import load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_sequence_classifier(cfg.model, cfg.dtype, device, trust_remote_code=cfg.trust_remote_code,
                                     num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier finds each sequence's end by its padding
    return model, tokenizer


JOB = Job(name="reward_model", config=RewardJobConfig, train=train, example_config="train_jobs/configs/local_reward.yaml",
          prepare=prepare_paths, check_inputs=check_inputs, settings=RewardJobConfig.training_settings)


def main(cfg: RewardJobConfig) -> dict:
    return run(JOB, cfg)
